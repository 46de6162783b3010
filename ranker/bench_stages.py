"""`python -m ranker.bench_stages`: time the service's pure CPU stages (no server, no Triton).

    python -m ranker.bench_stages --candidates 200 --top-k 20 --repeats 300 --json
    python -m ranker.bench_stages --release releases/homedepot --candidates 200 --json

Times diversity selection (none, caps, MMR, DPP, max-sum by windows of 10), blending and feature
assembly on `candidates` items: the release's real embeddings and titles when --release is given,
else random unit vectors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ranker import blending, diversity, features
from ranker.domain import DEFAULT_STRENGTH, DiversityMethod, DiversitySpec


def time_sync(call: Callable[[], object], repeats: int) -> list[float]:
    """Milliseconds per call, after a short warm-up."""
    for _ in range(min(20, repeats)):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(samples_ms)
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 90, 99)}


def timed(call: Callable[[], object], repeats: int) -> dict[str, float]:
    return percentiles(time_sync(call, repeats))


def sample(args: argparse.Namespace) -> tuple[np.ndarray, list[list[str]], list[str | None], list[str | None]]:
    rng = np.random.default_rng(0)
    n = args.candidates
    if args.release is None:
        emb = rng.normal(size=(n, 384)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        tokens = [[f"t{rng.integers(0, 500)}" for _ in range(rng.integers(4, 16))] for _ in range(n)]
        cats: list[str | None] = [f"c{rng.integers(0, 12)}" for _ in range(n)]
        brands: list[str | None] = [f"b{rng.integers(0, 30)}" for _ in range(n)]
        return emb, tokens, cats, brands
    from ranker.release import Release

    release = Release.load(args.release)
    rows = rng.choice(len(release.catalog), size=n, replace=False)
    emb = np.asarray(release.retriever.dense.embeddings[rows])
    catalog = release.catalog
    return (
        emb,
        release.analyzer.analyze_many([catalog.titles[r] for r in rows]),
        [catalog.categories[r] for r in rows],
        [catalog.brands[r] for r in rows],
    )


def bench(args: argparse.Namespace) -> dict[str, object]:
    emb, tokens, cats, brands = sample(args)
    n = len(emb)
    rng = np.random.default_rng(1)
    relevance = np.sort(rng.normal(size=n))[::-1]
    specs = {
        "none": DiversitySpec(),
        "caps": DiversitySpec(max_per_category=3, max_per_brand=2),
        "mmr": DiversitySpec(method=DiversityMethod.MMR, strength=args.strength),
        "dpp": DiversitySpec(method=DiversityMethod.DPP, strength=args.strength),
        "dpp+caps": DiversitySpec(method=DiversityMethod.DPP, strength=args.strength, max_per_brand=2),
        # docs/diversity.md's recommended setting (max-sum's useful strengths are ~10x smaller than MMR's).
        "max_sum/10": DiversitySpec(
            method=DiversityMethod.MAX_SUM, strength=DEFAULT_STRENGTH[DiversityMethod.MAX_SUM], window=10
        ),
    }
    result: dict[str, object] = {"candidates": n, "top_k": args.top_k, "source": str(args.release or "random")}

    def select(spec: DiversitySpec) -> Callable[[], object]:
        return lambda: diversity.select(relevance, emb, spec, args.top_k, cats, brands)

    result["diversity"] = {name: timed(select(spec), args.repeats) for name, spec in specs.items()}
    signals = {"ranker": relevance, "dense": rng.uniform(size=n), "lexical": rng.uniform(size=n) * 10}
    result["blend"] = timed(lambda: blending.blend(signals, blending.DEFAULT_POLICY), args.repeats)
    query = tokens[0][:3]
    titles = features.TitleIndex.build([" ".join(t) for t in tokens], tokens)
    rows = np.arange(n)
    result["features"] = timed(
        lambda: features.assemble(" ".join(query), query, titles, rows, rng.uniform(size=n), rng.uniform(size=n)),
        args.repeats,
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ranker.bench_stages", description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, help="use this release's embeddings and titles")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = bench(args)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
