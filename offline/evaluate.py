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

from tqdm import tqdm

from offline import metrics
from offline.data import judgments_by_query, load_catalog, load_judgments, split_queries
from ranker.domain import RankQuery
from ranker.models import OnnxEncoder, OnnxScorer, QueryTokenizer
from ranker.pipeline import PipelineSettings, Ranker
from ranker.release import ENCODER_MODEL, MODEL_REPOSITORY, RANKER_MODEL, TOKENIZER, Release

DEPTH = 100  # Recall@100 needs the top 100


def local_ranker(release: Release, *, dense_k: int | None = None, lexical_k: int | None = None) -> Ranker:
    """The service's pipeline over the release's ONNX files run in-process."""
    manifest = release.manifest
    repo = release.path / MODEL_REPOSITORY

    def onnx(model: str, version: str) -> Path:
        return repo / model / version / "model.onnx"

    return Ranker(
        release,
        encoder=OnnxEncoder(onnx(ENCODER_MODEL, manifest.encoder.version)),
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


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    release = Release.load(args.release)
    check_products(release, args.products)
    seed = int(release.manifest.raw.get("data", {}).get("split", {}).get("seed", args.seed))
    judged = select_queries(args.judgments, args.split, seed)
    queries = list(judged)[: args.limit] if args.limit else list(judged)
    ranker = local_ranker(release)
    start = time.perf_counter()
    runs = asyncio.run(run_queries(ranker, queries, progress=not args.quiet))
    elapsed = time.perf_counter() - start
    scores = metrics.evaluate(runs, {q: judged[q] for q in queries})
    return {
        "release_id": release.manifest.release_id,
        "split": args.split,
        "seed": seed,
        **scores,
        "ms_per_query": 1000.0 * elapsed / max(1, len(queries)),
    }


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
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = evaluate(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>14}: {value:.4f}" if isinstance(value, float) else f"{key:>14}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
