"""`python -m offline.evaluate`: rank the whole corpus for judged queries through the service's pipeline.

The release's ONNX files run in-process (ranker.models.OnnxEncoder / OnnxScorer) behind the same
Encoder/Scorer protocols the service uses with Triton, and every query goes through
ranker.pipeline.Ranker.rank — the same retrieval, features, scoring and blending code that serves
traffic. Metrics follow ../shared/data/README.md (offline.metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from offline import metrics
from offline.data import judgments_by_query, load_catalog, load_judgments, split_queries
from ranker.domain import RankQuery
from ranker.models import OnnxEncoder, OnnxScorer, QueryTokenizer
from ranker.pipeline import PipelineSettings, Ranker
from ranker.release import ENCODER_MODEL, MODEL_REPOSITORY, RANKER_MODEL, TOKENIZER, Release

DEPTH = 100  # Recall@100 needs the top 100

# Ablation stages: blend-weight overrides over the same pipeline and candidates. Each retriever's
# own top 400 is among the candidates, so its top 100 here equals whole-corpus retrieval.
STAGES: dict[str, dict[str, float]] = {
    "bm25": {"ranker": 0.0, "lexical": 1.0},
    "dense": {"ranker": 0.0, "dense": 1.0},
    "hybrid_rrf": {"ranker": 0.0, "retrieval": 1.0},
    "hybrid_ranker": {},
}


class CachingEncoder:
    """Encoder wrapper for evaluation: each query is encoded once however many stages rank it."""

    def __init__(self, inner: OnnxEncoder) -> None:
        self._inner = inner
        self._cache: dict[bytes, np.ndarray] = {}

    async def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, timeout: float | None) -> np.ndarray:
        key = input_ids.tobytes() + attention_mask.tobytes()
        if key not in self._cache:
            self._cache[key] = await self._inner.encode(input_ids, attention_mask, timeout=timeout)
        return self._cache[key]


def local_ranker(release: Release, *, dense_k: int | None = None, lexical_k: int | None = None) -> Ranker:
    """The service's pipeline over the release's ONNX files run in-process."""
    manifest = release.manifest
    repo = release.path / MODEL_REPOSITORY

    def onnx(model: str, version: str) -> Path:
        return repo / model / version / "model.onnx"

    return Ranker(
        release,
        encoder=CachingEncoder(OnnxEncoder(onnx(ENCODER_MODEL, manifest.encoder.version))),
        scorer=OnnxScorer(onnx(RANKER_MODEL, manifest.ranker.version)),
        tokenizer=QueryTokenizer(release.path / TOKENIZER, manifest.max_query_tokens),
        settings=PipelineSettings(
            dense_k=dense_k or int(manifest.ranker.extra.get("dense_k", 400)),
            lexical_k=lexical_k or int(manifest.ranker.extra.get("lexical_k", 400)),
        ),
    )


def select_queries(judgments_path: Path, split: str, seed: int) -> dict[str, dict[str, float]]:
    judgments = load_judgments(judgments_path)
    if split != "all":
        parts = split_queries(judgments, seed)
        judgments = parts.dev if split == "dev" else parts.train
    return {q: j for q, j in judgments_by_query(judgments).items() if metrics.qualifies(j)}


async def run_queries(
    ranker: Ranker, queries: Sequence[str], *, weights: Mapping[str, float] | None = None, progress: bool = True
) -> dict[str, list[str]]:
    runs: dict[str, list[str]] = {}
    for i, text in enumerate(tqdm(queries, desc="ranking", unit="query", disable=not progress, file=sys.stderr)):
        query = RankQuery(request_id=f"eval-{i}", query=text, top_k=DEPTH, weights=dict(weights or {}))
        result = await ranker.rank(query)
        runs[text] = [item.item_id for item in result.items]
    return runs


def check_products(release: Release, products: Path) -> None:
    """The judged corpus must be the release's corpus, or the numbers mean nothing."""
    ids = set(load_catalog(products)["item_id"].to_list())
    served = set(release.catalog.item_ids)
    if ids != served:
        raise SystemExit(
            f"{products} has {len(ids)} items, the release serves {len(served)} "
            f"({len(ids - served)} missing from the release): evaluate the release built from this catalog"
        )


def score_runs(runs: Mapping[str, Sequence[str]], judged: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Mean metrics with bootstrap 95% confidence intervals (queries resampled)."""
    values = metrics.per_query(runs, judged)
    result: dict[str, Any] = {"queries": len(values["mrr"])}
    for name, per_query in values.items():
        result[name] = float(per_query.mean()) if len(per_query) else 0.0
    result["ci95"] = {name: list(metrics.bootstrap_ci(v)) for name, v in values.items()}
    return result


def _encoder_label(release: Release) -> str:
    return "fine-tuned" if release.manifest.encoder.extra.get("finetuned") else "pretrained"


def ablation(
    release: Release,
    ranker: Ranker,
    queries: Sequence[str],
    judged: Mapping[str, Mapping[str, float]],
    *,
    baseline: Release | None,
    quiet: bool,
) -> list[dict[str, Any]]:
    rows = []
    if baseline is not None:
        base_ranker = local_ranker(baseline)
        runs = asyncio.run(run_queries(base_ranker, queries, weights=STAGES["dense"], progress=not quiet))
        label = f"dense ({_encoder_label(baseline)}, {baseline.manifest.release_id})"
        rows.append({"stage": label, **score_runs(runs, judged)})
    for stage, weights in STAGES.items():
        runs = asyncio.run(run_queries(ranker, queries, weights=weights, progress=not quiet))
        label = f"dense ({_encoder_label(release)})" if stage == "dense" else stage
        rows.append({"stage": label, **score_runs(runs, judged)})
    return rows


def plot_stages(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["stage"]) for r in rows]
    values = [float(r["ndcg@10"]) for r in rows]
    low = [v - float(r["ci95"]["ndcg@10"][0]) for v, r in zip(values, rows, strict=True)]
    high = [float(r["ci95"]["ndcg@10"][1]) - v for v, r in zip(values, rows, strict=True)]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh(labels[::-1], values[::-1], xerr=[low[::-1], high[::-1]], color="#4c72b0", capsize=4)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values[::-1]], padding=14)
    ax.set_xlabel("NDCG@10 (bootstrap 95% CI)")
    ax.set_xlim(0, max(values) * 1.25)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    release = Release.load(args.release)
    check_products(release, args.products)
    seed = int(release.manifest.raw.get("data", {}).get("split", {}).get("seed", args.seed))
    judged = select_queries(args.judgments, args.split, seed)
    queries = list(judged)[: args.limit] if args.limit else list(judged)
    judged = {q: judged[q] for q in queries}
    ranker = local_ranker(release)
    start = time.perf_counter()
    runs = asyncio.run(run_queries(ranker, queries, progress=not args.quiet))
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {
        "release_id": release.manifest.release_id,
        "split": args.split,
        "seed": seed,
        **score_runs(runs, judged),
        "ms_per_query": 1000.0 * elapsed / max(1, len(queries)),
    }
    if args.ablation or args.plot:
        baseline = Release.load(args.baseline) if args.baseline else None
        if baseline is not None:
            check_products(baseline, args.products)
        result["ablation"] = ablation(release, ranker, queries, judged, baseline=baseline, quiet=args.quiet)
        if args.plot:
            title = (
                f"Home Depot {args.split} split, {result['queries']} queries"
                if "homedepot" in str(args.products)
                else f"{args.split} split, {result['queries']} queries"
            )
            plot_stages(result["ablation"], args.plot, title)
    return result


def print_table(result: Mapping[str, Any]) -> None:
    rows = result.get("ablation") or [{"stage": "hybrid_ranker", **result}]
    print(f"release {result['release_id']}, split {result['split']}, {result['queries']} queries")
    print(f"{'stage':<44} {'NDCG@10':>22} {'Recall@100':>22} {'MRR':>22}")
    for row in rows:
        cells = [
            f"{row[m]:.3f} [{row['ci95'][m][0]:.3f}, {row['ci95'][m][1]:.3f}]" for m in ("ndcg@10", "recall@100", "mrr")
        ]
        print(f"{row['stage']:<44} " + " ".join(f"{c:>22}" for c in cells))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m offline.evaluate", description=__doc__)
    parser.add_argument("--release", type=Path, required=True, help="release folder written by offline.export")
    parser.add_argument("--products", type=Path, required=True, help="the catalog the release was built from")
    parser.add_argument("--judgments", type=Path, required=True, help="graded judgments (query, item_id, relevance)")
    parser.add_argument(
        "--split",
        choices=("dev", "train", "all"),
        default="dev",
        help="which queries: the release's held-out dev split (default), its train split, or all",
    )
    parser.add_argument("--seed", type=int, default=13, help="split seed when the manifest records none")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N qualifying queries")
    parser.add_argument("--ablation", action="store_true", help="also score BM25, dense, RRF and ranker stages")
    parser.add_argument("--baseline", type=Path, help="with --ablation: a release whose dense stage is a row too")
    parser.add_argument("--plot", type=Path, help="write a PNG of NDCG@10 per stage (implies --ablation)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = evaluate(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
