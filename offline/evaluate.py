"""`python -m offline.evaluate`: rank the whole corpus for judged queries through the service's pipeline.

The release's ONNX files run in-process (ranker.models.OnnxEncoder / OnnxScorer) behind the same
Encoder/Scorer protocols the service uses with Triton, and every query goes through
ranker.pipeline.Ranker.rank — the same retrieval, features, scoring and blending code that serves
traffic. Metrics follow ../shared/data/README.md (offline.metrics).

With --diversity every query carries that DiversitySpec; the result then also reports how varied
the top 10 is (ILD@10, category and brand coverage@10; offline.metrics). A release without
categories/brands gets them derived in memory (offline.attributes.fill_attributes), used for the
caps and the coverage metrics, and the JSON says "attributes": "derived". --tradeoff sweeps the
strength of each curve in --curves (MMR and DPP by default; "max_sum/10" is max-sum by windows of
10) and plots NDCG@10 against ILD@10 (docs/diversity.md).

`python -m offline.evaluate personalization ...` evaluates user profiles and recommendations instead
(offline.personalization, docs/personalization.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from offline import cli, metrics
from offline.attributes import fill_attributes
from offline.data import judgments_by_query, load_catalog, load_judgments, split_queries
from ranker.domain import DEFAULT_STRENGTH, DiversityMethod, DiversitySpec, RankQuery
from ranker.models import ONNX_FILE, OnnxEncoder, OnnxScorer, QueryTokenizer, encoder_cpu_onnx
from ranker.pipeline import PipelineSettings, Ranker
from ranker.release import ENCODER_MODEL, MODEL_REPOSITORY, RANKER_MODEL, TOKENIZER, Release
from ranker.retrieval import EF_SEARCH

DEPTH = 100  # Recall@100 needs the top 100

# Ablation stages: blend-weight overrides over the same pipeline and candidates. Each retriever's
# own top DEPTH (at least) is among the candidates, so its top 100 here equals whole-corpus retrieval.
STAGES: dict[str, dict[str, float]] = {
    "bm25": {"ranker": 0.0, "lexical": 1.0},
    "dense": {"ranker": 0.0, "dense": 1.0},
    "hybrid_rrf": {"ranker": 0.0, "retrieval": 1.0},
    "hybrid_ranker": {},
}

TRADEOFF_STRENGTHS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)
MAX_SUM_STRENGTHS = (0.0, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1)  # max-sum's useful range is ~10x lower
TRADEOFF_CURVES = (("mmr", 0), ("dpp", 0))  # (method, window)
DIVERSITY_K = 10


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

    return Ranker(
        release,
        # The files Triton's CPU configs run, so served and evaluated rankings agree (int8 query encoder).
        encoder=CachingEncoder(OnnxEncoder(encoder_cpu_onnx(repo / ENCODER_MODEL / manifest.encoder.version))),
        scorer=OnnxScorer(repo / RANKER_MODEL / manifest.ranker.version / ONNX_FILE),
        tokenizer=QueryTokenizer(release.path / TOKENIZER, manifest.max_query_tokens),
        settings=PipelineSettings.for_release(manifest, dense_k=dense_k, lexical_k=lexical_k),
    )


def select_queries(judgments_path: Path, split: str, seed: int) -> dict[str, dict[str, float]]:
    judgments = load_judgments(judgments_path)
    if split != "all":
        parts = split_queries(judgments, seed)
        judgments = parts.dev if split == "dev" else parts.train
    return {q: j for q, j in judgments_by_query(judgments).items() if metrics.qualifies(j)}


async def run_queries(
    ranker: Ranker,
    queries: Sequence[str],
    *,
    weights: Mapping[str, float] | None = None,
    diversity: DiversitySpec | None = None,
    progress: bool = True,
) -> dict[str, list[str]]:
    runs: dict[str, list[str]] = {}
    spec = diversity or DiversitySpec()
    for i, text in enumerate(tqdm(queries, desc="ranking", unit="query", disable=not progress, file=sys.stderr)):
        query = RankQuery(request_id=f"eval-{i}", query=text, top_k=DEPTH, weights=dict(weights or {}), diversity=spec)
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


def with_attributes(release: Release) -> tuple[Release, str, dict[str, float]]:
    """The release with every category/brand filled ("given", "derived" or "given+derived").

    Derived values exist only in memory here: the caps and the coverage metrics need them, and a
    title-only catalog (Home Depot) has none.
    """
    catalog = release.catalog
    missing = sum(c is None for c in catalog.categories) + sum(b is None for b in catalog.brands)
    if missing == 0:
        return release, "given", {"category": 1.0, "brand": 1.0}
    items = pl.DataFrame(
        {"item_id": catalog.item_ids, "title": catalog.titles, "category": catalog.categories, "brand": catalog.brands},
        schema={"item_id": pl.Utf8, "title": pl.Utf8, "category": pl.Utf8, "brand": pl.Utf8},
    )
    filled, report = fill_attributes(items, np.asarray(release.retriever.dense.embeddings))
    coverage = {name: float(report[name]["coverage"]) for name in ("category", "brand")}
    catalog = dataclasses.replace(catalog, categories=filled["category"].to_list(), brands=filled["brand"].to_list())
    given = 2 * len(release.catalog) - missing
    return dataclasses.replace(release, catalog=catalog), "derived" if given == 0 else "given+derived", coverage


def diversity_scores(release: Release, runs: Mapping[str, Sequence[str]], k: int = DIVERSITY_K) -> dict[str, float]:
    """Mean ILD@k and category/brand coverage@k (distinct values in the top k, a count) over the runs."""
    catalog = release.catalog
    embeddings = release.retriever.dense.embeddings
    ild, categories, brands = [], [], []
    for ranked in runs.values():
        rows = [catalog.row_of[item_id] for item_id in ranked[:k]]
        ild.append(metrics.ild_at_k(np.asarray(embeddings[rows]) if rows else np.zeros((0, 1)), k))
        categories.append(metrics.coverage_at_k([catalog.categories[r] for r in rows], k))
        brands.append(metrics.coverage_at_k([catalog.brands[r] for r in rows], k))
    mean = lambda values: float(np.mean(values)) if values else 0.0  # noqa: E731
    return {f"ild@{k}": mean(ild), f"category_coverage@{k}": mean(categories), f"brand_coverage@{k}": mean(brands)}


def diversity_spec(
    args: argparse.Namespace, method: str | None = None, strength: float | None = None, window: int | None = None
) -> DiversitySpec:
    kind = DiversityMethod(method or args.diversity)
    if strength is None:
        strength = args.diversity_strength
    if strength is None:
        strength = DEFAULT_STRENGTH[kind]
    return DiversitySpec(
        method=kind,
        strength=float(strength),
        max_per_category=args.max_per_category,
        max_per_brand=args.max_per_brand,
        window=args.diversity_window if window is None else window,
    )


def parse_curves(text: str) -> tuple[tuple[str, int], ...]:
    """--curves: comma-separated "method" or "method/window" (e.g. "mmr,max_sum/10")."""
    result = []
    for entry in text.split(","):
        method, _, window = entry.partition("/")
        DiversityMethod(method)  # ValueError: argparse reports the entry
        result.append((method, int(window or 0)))
    return tuple(result)


def tradeoff(
    release: Release,
    ranker: Ranker,
    queries: Sequence[str],
    judged: Mapping[str, Mapping[str, float]],
    args: argparse.Namespace,
    *,
    strengths: Sequence[float] = TRADEOFF_STRENGTHS,
    curves: Sequence[tuple[str, int]] = TRADEOFF_CURVES,
    max_sum_strengths: Sequence[float] = MAX_SUM_STRENGTHS,
) -> list[dict[str, Any]]:
    """NDCG@10, Recall@100 and diversity per (method, window, strength); strength 0 is shared by all curves."""
    rows: list[dict[str, Any]] = []
    base: dict[str, Any] | None = None
    for method, window in curves:
        for strength in max_sum_strengths if method == DiversityMethod.MAX_SUM.value else strengths:
            if strength <= 0 and base is not None:
                rows.append({**base, "method": method, "window": window})
                continue
            spec = diversity_spec(args, method, strength, window)
            runs = asyncio.run(run_queries(ranker, queries, diversity=spec, progress=not args.quiet))
            scored = score_runs(runs, judged)
            row = {
                "method": method,
                "window": window,
                "strength": strength,
                "ndcg@10": scored["ndcg@10"],
                "recall@100": scored["recall@100"],
                "mrr": scored["mrr"],
                **diversity_scores(release, runs),
            }
            if strength <= 0:
                base = row
            rows.append(row)
    if base is not None:
        for row in rows:
            row["ndcg_change"] = row["ndcg@10"] / base["ndcg@10"] - 1.0 if base["ndcg@10"] else 0.0
            row["ild_change"] = row["ild@10"] / base["ild@10"] - 1.0 if base["ild@10"] else 0.0
    return rows


def plot_tradeoff(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = list(dict.fromkeys((str(r["method"]), int(r.get("window", 0))) for r in rows))
    colours = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
    for (method, window), colour in zip(curves, colours * len(curves), strict=False):
        points = sorted(
            (r for r in rows if (r["method"], int(r.get("window", 0))) == (method, window)),
            key=lambda r: float(r["strength"]),
        )
        xs = [float(r["ild@10"]) for r in points]
        ys = [float(r["ndcg@10"]) for r in points]
        label = method.upper() + (f", window {window}" if window else "")
        ax.plot(xs, ys, marker="o", color=colour, label=label)
        for r, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"{float(r['strength']):g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    base = next((r for r in rows if float(r["strength"]) <= 0), None)
    if base is not None:  # the issue #4 target: +30% ILD@10 for at most 2% of NDCG@10
        ax.axhline(0.98 * float(base["ndcg@10"]), color="grey", linestyle=":", linewidth=1, label="−2% NDCG@10")
        ax.axvline(1.3 * float(base["ild@10"]), color="grey", linestyle="--", linewidth=1, label="+30% ILD@10")
    ax.set_xlabel("ILD@10 (1 − mean pairwise cosine of the top 10)")
    ax.set_ylabel("NDCG@10")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="method (points: strength)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    diversity: DiversitySpec | None = None,
) -> list[dict[str, Any]]:
    rows = []
    if baseline is not None:
        base_ranker = local_ranker(baseline)
        runs = asyncio.run(run_queries(base_ranker, queries, weights=STAGES["dense"], progress=not quiet))
        label = f"dense ({_encoder_label(baseline)}, {baseline.manifest.release_id})"
        rows.append({"stage": label, **score_runs(runs, judged)})
    for stage, weights in STAGES.items():
        runs = asyncio.run(run_queries(ranker, queries, weights=weights, diversity=diversity, progress=not quiet))
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
    release = Release.load(args.release, ef_search=args.ef_search)
    check_products(release, args.products)
    trained_on = release.manifest.raw.get("data") or {}
    seed = int((trained_on.get("split") or {}).get("seed", args.seed))  # a release without judgments: no split
    judged = select_queries(args.judgments, args.split, seed)
    queries = list(judged)[: args.limit] if args.limit else list(judged)
    judged = {q: judged[q] for q in queries}
    release, attributes, attribute_coverage = with_attributes(release)
    ranker = local_ranker(release, dense_k=args.dense_k, lexical_k=args.lexical_k)
    spec = diversity_spec(args)
    start = time.perf_counter()
    runs = asyncio.run(run_queries(ranker, queries, diversity=spec, progress=not args.quiet))
    elapsed = time.perf_counter() - start
    result: dict[str, Any] = {
        "release_id": release.manifest.release_id,
        "split": args.split,
        "seed": seed,
        **score_runs(runs, judged),
        **diversity_scores(release, runs),
        "attributes": attributes,
        "attribute_coverage": attribute_coverage,
        "diversity": {
            "method": spec.method.value,
            "strength": spec.strength,
            "max_per_category": spec.max_per_category,
            "max_per_brand": spec.max_per_brand,
            "window": spec.window,
        },
        "candidates": {
            "dense_k": ranker.settings.dense_k,
            "lexical_k": ranker.settings.lexical_k,
            "ef_search": args.ef_search,
        },
        "ms_per_query": 1000.0 * elapsed / max(1, len(queries)),
    }
    if args.tradeoff:
        result["tradeoff"] = tradeoff(
            release,
            ranker,
            queries,
            judged,
            args,
            strengths=args.strengths,
            curves=args.curves,
            max_sum_strengths=args.max_sum_strengths,
        )
        name = "Home Depot" if "homedepot" in str(args.products) else "examples"
        plot_tradeoff(result["tradeoff"], args.tradeoff, f"{name} {args.split} split, {result['queries']} queries")
    if args.ablation or args.plot:
        baseline = Release.load(args.baseline) if args.baseline else None
        if baseline is not None:
            check_products(baseline, args.products)
        result["ablation"] = ablation(
            release, ranker, queries, judged, baseline=baseline, quiet=args.quiet, diversity=spec
        )
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
    spec = result["diversity"]
    window = f", window {spec['window']}" if spec.get("window") else ""
    print(
        f"diversity {spec['method']} (strength {spec['strength']:g}{window}): ILD@10 {result['ild@10']:.3f}, "
        f"category coverage@10 {result['category_coverage@10']:.2f}, brand coverage@10 "
        f"{result['brand_coverage@10']:.2f} (attributes {result['attributes']})"
    )
    for row in result.get("tradeoff", []):
        print(
            f"  {row['method']:<7} w{row.get('window', 0):<3} {row['strength']:<5g} "
            f"NDCG@10 {row['ndcg@10']:.4f} ({row['ndcg_change']:+.1%})  "
            f"ILD@10 {row['ild@10']:.4f} ({row['ild_change']:+.1%})  categories {row['category_coverage@10']:.2f}  "
            f"brands {row['brand_coverage@10']:.2f}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m offline.evaluate", description=__doc__)
    parser.add_argument(
        "--release", type=cli.existing_dir, required=True, help="release folder written by offline.export"
    )
    parser.add_argument(
        "--products", type=cli.existing_file, required=True, help="the catalog the release was built from"
    )
    parser.add_argument(
        "--judgments", type=cli.existing_file, required=True, help="graded judgments (query, item_id, relevance)"
    )
    parser.add_argument(
        "--split",
        choices=("dev", "train", "all"),
        default="dev",
        help="which queries: the release's held-out dev split (default), its train split, or all",
    )
    parser.add_argument("--seed", type=int, default=13, help="split seed when the manifest records none")
    parser.add_argument("--limit", type=cli.count(0), default=0, help="evaluate only the first N qualifying queries")
    parser.add_argument("--ablation", action="store_true", help="also score BM25, dense, RRF and ranker stages")
    parser.add_argument(
        "--baseline", type=cli.existing_dir, help="with --ablation: a release whose dense stage is a row too"
    )
    parser.add_argument("--plot", type=Path, help="write a PNG of NDCG@10 per stage (implies --ablation)")
    parser.add_argument(
        "--diversity",
        choices=[m.value for m in DiversityMethod],
        default="none",
        help="diversify every query's top k with this method (ranker.diversity)",
    )
    parser.add_argument(
        "--diversity-strength",
        type=cli.fraction,
        help="0 = pure relevance .. 1 = pure diversity (default: the method's, e.g. mmr 0.3, max_sum 0.04)",
    )
    parser.add_argument(
        "--diversity-window",
        type=cli.count(0),
        default=0,
        help="diversify each run of this many positions on its own, shown in relevance order (0: whole list)",
    )
    # The service's candidate settings (RANKER_DENSE_K, RANKER_LEXICAL_K, RANKER_EF_SEARCH): what a
    # shallower, faster candidate set costs in quality.
    parser.add_argument("--dense-k", type=cli.count(1), help="ANN candidates per query (default: the release's)")
    parser.add_argument("--lexical-k", type=cli.count(1), help="BM25 candidates per query (default: the release's)")
    parser.add_argument(
        "--ef-search", type=cli.count(1), default=EF_SEARCH, help=f"HNSW search breadth (default {EF_SEARCH})"
    )
    parser.add_argument(
        "--max-per-category", type=cli.count(0), default=0, help="cap per category in the top k (0: none)"
    )
    parser.add_argument("--max-per-brand", type=cli.count(0), default=0, help="cap per brand in the top k (0: none)")
    parser.add_argument(
        "--tradeoff",
        type=Path,
        help="sweep each --curves method over its strengths: PNG of NDCG@10 vs ILD@10, rows in the JSON",
    )
    parser.add_argument(
        "--curves",
        type=parse_curves,
        default=TRADEOFF_CURVES,
        help="with --tradeoff: comma-separated method or method/window, e.g. mmr,dpp,max_sum/10 (default mmr,dpp)",
    )
    parser.add_argument(
        "--max-sum-strengths",
        type=cli.fractions,
        default=MAX_SUM_STRENGTHS,
        help=f"with --tradeoff: the strengths of max_sum curves (default {','.join(map(str, MAX_SUM_STRENGTHS))})",
    )
    parser.add_argument(
        "--strengths",
        type=cli.fractions,
        default=TRADEOFF_STRENGTHS,
        help="with --tradeoff: comma-separated strengths of the mmr and dpp curves",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["personalization"]:
        from offline import personalization

        return personalization.main(argv[1:])
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except cli.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
