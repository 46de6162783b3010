"""`python -m offline.evaluate personalization`: replay shoppers' histories through the service's profile code,
recommend from each profile through the service's pipeline, and score the next item.

Data: ../shared/data/amazon_scientific (Amazon "Industrial & Scientific" in UniSRec's split). Every
item of a user's history becomes a PURCHASE event (one a day, oldest first: the data has no
timestamps) recorded through ranker.personal.Personalizer.record into an EmbeddedProfileStore; then
ranker.pipeline.Ranker.rank answers a recommendation request (user_id, no query, exclude_purchased)
over all items. Item embeddings are all-MiniLM-L6-v2 over the item text (cached under
~/.cache/ranker/embeddings); the item-to-item neighbours (ranker.neighbours) are learned from the
training histories only.

Splits:
  valid    history = the user's training sequence, target = the valid item (the README's split)
  holdout  history = the training sequence without its last item, target = that item; the neighbours
           are learned without those items. Used to choose the scorer's weights, so that the valid
           targets are never looked at while tuning.
The popularity baseline ranks items by their count in the same training sequences.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
from tqdm import tqdm

from offline import metrics
from ranker.domain import DiversitySpec, RankQuery
from ranker.events import Event, EventType
from ranker.features import FEATURE_NAMES
from ranker.models import QueryTokenizer
from ranker.neighbours import ItemNeighbours
from ranker.personal import COMPONENTS, Personalizer, PersonalWeights, components
from ranker.pipeline import PipelineSettings, Ranker
from ranker.profiles import EmbeddedProfileStore, ItemSpace
from ranker.release import Catalog, Manifest, Release
from ranker.retrieval import Analyzer, DenseIndex, HybridRetriever, LexicalIndex

DEFAULT_DATA = Path("../shared/data/amazon_scientific")
EMBEDDING_CACHE = Path.home() / ".cache" / "ranker" / "embeddings"
MAX_TEXT_TOKENS = 128  # title + category path + brand; the longest texts stay whole
K = 10
DAY_S = 86400.0
START = 1514764800.0  # 2018-01-01: the first event of every replayed history


@dataclass(frozen=True, kw_only=True)
class Dataset:
    item_ids: list[str]  # original ids, by item index
    texts: list[str]
    titles: list[str]
    categories: list[str | None]
    brands: list[str | None]
    train: dict[int, list[int]]  # user -> training sequence (item indices, oldest first)
    valid: list[tuple[int, list[int], int]]  # (user, history, next item)


def parse_text(text: str) -> tuple[str, str | None, str | None]:
    """Scientific.text is "<title>. <category path>. <brand>. "; a title may contain ". " itself."""
    parts = [p.strip() for p in text.strip().rstrip(".").split(". ")]
    if len(parts) < 3:
        return text.strip(), None, None
    return ". ".join(parts[:-2]), parts[-2] or None, parts[-1] or None


def _inter(path: Path) -> list[tuple[int, list[int], int]]:
    rows = []
    with path.open() as f:
        next(f)  # header
        for line in f:
            user, history, target = line.rstrip("\n").split("\t")
            rows.append((int(user), [int(i) for i in history.split()], int(target)))
    return rows


def load(data: Path) -> Dataset:
    index: dict[str, int] = {}
    for line in (data / "Scientific.item2index").read_text().splitlines():
        original, position = line.split("\t")
        index[original] = int(position)
    item_ids = [""] * len(index)
    for original, row in index.items():
        item_ids[row] = original
    texts = [""] * len(index)
    for line in (data / "Scientific.text").read_text().splitlines()[1:]:
        original, text = line.split("\t", 1)
        texts[index[original]] = text.strip()
    parsed = [parse_text(t) for t in texts]
    train: dict[int, list[int]] = {}
    for user, history, target in _inter(data / "Scientific.train.inter"):
        sequence = [*history, target]
        if len(sequence) > len(train.get(user, [])):
            train[user] = sequence
    return Dataset(
        item_ids=item_ids,
        texts=texts,
        titles=[p[0] for p in parsed],
        categories=[p[1] for p in parsed],
        brands=[p[2] for p in parsed],
        train=train,
        valid=_inter(data / "Scientific.valid.inter"),
    )


@dataclass(frozen=True, kw_only=True)
class Cases:
    users: list[int]
    histories: list[list[int]]
    targets: list[int]
    training: list[list[int]]  # the sequences neighbours and popularity are learned from


def cases(ds: Dataset, split: str) -> Cases:
    if split == "valid":
        return Cases(
            users=[u for u, _, _ in ds.valid],
            histories=[h for _, h, _ in ds.valid],
            targets=[t for _, _, t in ds.valid],
            training=[ds.train[u] for u in sorted(ds.train)],
        )
    if split == "holdout":
        chosen = [u for u in sorted(ds.train) if len(ds.train[u]) >= 3]
        return Cases(
            users=chosen,
            histories=[ds.train[u][:-1] for u in chosen],
            targets=[ds.train[u][-1] for u in chosen],
            training=[ds.train[u][:-1] for u in sorted(ds.train)],
        )
    raise ValueError(f"split must be 'valid' or 'holdout', got {split!r}")


def item_embeddings(texts: Sequence[str], cache: Path = EMBEDDING_CACHE) -> np.ndarray:
    """all-MiniLM-L6-v2 (mean-pooled, L2-normalised) over the texts, cached by content."""
    from offline import encoder

    key = hashlib.sha256(json.dumps([encoder.BASE_MODEL, MAX_TEXT_TOKENS, list(texts)]).encode()).hexdigest()[:16]
    path = cache / f"{key}.npy"
    if path.is_file():
        return np.load(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from offline import train_encoder

    model, tokenizer = encoder.load_reference()
    vectors = train_encoder.embed(
        model, tokenizer, list(texts), max_tokens=MAX_TEXT_TOKENS, device="cpu", desc="embed items"
    )
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, vectors)
    partial.replace(path)
    return vectors


def build_release(ds: Dataset, embeddings: np.ndarray, neighbours: ItemNeighbours, source: Path) -> Release:
    """An in-memory release over the dataset's items (no ranker model: recommendations do not use it)."""
    analyzer = Analyzer()
    frame = pl.DataFrame(
        {"item_id": ds.item_ids, "title": ds.titles, "category": ds.categories, "brand": ds.brands},
        schema={"item_id": pl.Utf8, "title": pl.Utf8, "category": pl.Utf8, "brand": pl.Utf8},
    )
    catalog = Catalog.from_frame(frame, analyzer)
    manifest = Manifest.from_json(
        {
            "format": 1,
            "release_id": f"amazon-scientific-{len(ds.item_ids)}",
            "created_at": "1970-01-01T00:00:00Z",
            "models": {
                "text_encoder": {"version": 1, "dim": int(embeddings.shape[1]), "max_query_tokens": 32},
                "ranker": {"version": 1, "features": list(FEATURE_NAMES)},
            },
            "index": {"items": len(ds.item_ids)},
        }
    )
    retriever = HybridRetriever(DenseIndex.build(embeddings), LexicalIndex.build(analyzer.analyze_many(catalog.titles)))
    return Release(
        path=source, manifest=manifest, catalog=catalog, retriever=retriever, analyzer=analyzer, neighbours=neighbours
    )


class _NoModel:
    """Encoder, scorer and tokenizer stand-in: recommendations (no query) never call them."""

    async def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, timeout: float | None) -> np.ndarray:
        raise RuntimeError("recommendations do not encode a query")

    async def score(self, features: np.ndarray, *, timeout: float | None) -> np.ndarray:
        raise RuntimeError("recommendations do not use the ranker model")

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        raise RuntimeError("recommendations do not tokenize a query")


def recommender(release: Release, personalizer: Personalizer, depth: int) -> Ranker:
    unused = _NoModel()
    return Ranker(
        release,
        encoder=unused,
        scorer=unused,
        tokenizer=cast(QueryTokenizer, unused),
        settings=PipelineSettings(dense_k=depth, lexical_k=depth),
        personalizer=personalizer,
    )


def history_events(user: int, history: Sequence[int], item_ids: Sequence[str]) -> list[Event]:
    return [
        Event(
            event_id=f"{user}:{i}",
            user_id=str(user),
            item_id=item_ids[item],
            type=EventType.PURCHASE,
            timestamp=START + i * DAY_S,
        )
        for i, item in enumerate(history)
    ]


async def replay(personalizer: Personalizer, release: Release, c: Cases, *, quiet: bool) -> None:
    """Each history as RecordEvents would apply it (one batch per user)."""
    items = ItemSpace.of(release)
    ids = release.catalog.item_ids
    for user, history in tqdm(
        list(zip(c.users, c.histories, strict=True)), desc="replay events", unit="user", disable=quiet, file=sys.stderr
    ):
        await personalizer.record(items, history_events(user, history, ids))


async def recommend(
    ranker: Ranker, c: Cases, *, exclude_purchased: bool, desc: str, quiet: bool
) -> dict[str, list[str]]:
    runs: dict[str, list[str]] = {}
    for user in tqdm(c.users, desc=desc, unit="user", disable=quiet, file=sys.stderr):
        query = RankQuery(
            request_id=f"rec-{user}",
            query="",
            top_k=K,
            user_id=str(user),
            exclude_purchased=exclude_purchased,
            diversity=DiversitySpec(),
        )
        result = await ranker.rank(query)
        runs[str(user)] = [item.item_id for item in result.items]
    return runs


def popularity_runs(c: Cases, item_ids: Sequence[str], *, exclude_purchased: bool) -> dict[str, list[str]]:
    """The most frequent items of the training sequences (ties by item index), the history left out or not."""
    counts = np.bincount(np.concatenate([np.asarray(s) for s in c.training]), minlength=len(item_ids))
    order = np.lexsort((np.arange(len(item_ids)), -counts))
    runs = {}
    for user, history in zip(c.users, c.histories, strict=True):
        seen = set(history) if exclude_purchased else set()
        top = []
        for item in order:
            if int(item) not in seen:
                top.append(item_ids[item])
                if len(top) == K:
                    break
        runs[str(user)] = top
    return runs


def score(runs: Mapping[str, Sequence[str]], c: Cases, item_ids: Sequence[str]) -> dict[str, Any]:
    """NDCG@10 and Recall@10 of the single next item, with bootstrap 95% intervals (users resampled)."""
    ndcg, recall = [], []
    for user, target in zip(c.users, c.targets, strict=True):
        judged = {item_ids[target]: 2.0}  # gain = relevance - 1 = 1 (offline.metrics conventions)
        ranked = runs.get(str(user), [])
        ndcg.append(metrics.ndcg_at_k(ranked, judged, K))
        recall.append(metrics.recall_at_k(ranked, judged, K))
    values = {f"ndcg@{K}": np.array(ndcg), f"recall@{K}": np.array(recall)}
    return {
        "users": len(ndcg),
        **{name: float(v.mean()) if len(v) else 0.0 for name, v in values.items()},
        "ci95": {name: list(metrics.bootstrap_ci(v)) for name, v in values.items()},
    }


def with_weights(base: PersonalWeights, values: Mapping[str, float]) -> PersonalWeights:
    fields: dict[str, Any] = {k: int(v) if k == "recent_items" else float(v) for k, v in values.items()}
    return dataclasses.replace(base, **fields)


def ablation_variants(base: PersonalWeights) -> dict[str, PersonalWeights]:
    """Each component alone (weight 1, or its default), and the default without each of its components."""
    zero = {c: 0.0 for c in COMPONENTS}
    variants: dict[str, PersonalWeights] = {}
    for c in COMPONENTS:
        alone = base.of(c) or 1.0
        variants[f"{c} only"] = with_weights(base, {**zero, c: alone})
    for c in COMPONENTS:
        if base.of(c):
            variants[f"default without {c}"] = with_weights(base, {c: 0.0})
    return variants


async def direct_runs(
    personalizer: Personalizer,
    release: Release,
    c: Cases,
    variants: Mapping[str, PersonalWeights],
    *,
    exclude: bool,
    quiet: bool,
) -> dict[str, dict[str, list[str]]]:
    """Top 10 per user for each weight variant, straight from ranker.personal.components over every item.

    With no query and every item a candidate, the pipeline orders by the personal score (min-max
    normalised, ties by item id); this does the same without the per-request overhead, so an ablation
    of many variants takes minutes, not hours. `ablation_agrees_with_pipeline` checks the default."""
    items = ItemSpace.of(release)
    ids = release.catalog.item_ids
    every = np.arange(len(ids))
    id_order = np.argsort(np.argsort(np.array(ids, dtype=object), kind="stable"), kind="stable")
    base = next(iter(variants.values()))
    runs: dict[str, dict[str, list[str]]] = {label: {} for label in variants}
    for user in tqdm(c.users, desc="ablation", unit="user", disable=quiet, file=sys.stderr):
        profile, _ = await personalizer.lookup(str(user))
        if profile is None:
            raise RuntimeError(f"user {user} has no profile after the replay")
        profile = personalizer.align(profile, items)
        parts = components(profile, every, items, release.neighbours, base)
        excluded = np.zeros(len(ids), dtype=bool)
        if exclude:
            excluded[[release.catalog.row_of[i] for i in profile.purchased]] = True
        for label, w in variants.items():
            total = sum((w.of(name) * parts[name] for name in COMPONENTS), start=np.zeros(len(ids)))
            order = np.lexsort((id_order, -np.where(excluded, -np.inf, total)))
            runs[label][str(user)] = [ids[r] for r in order[: K + int(excluded.sum())] if not excluded[r]][:K]
    return runs


TUNED = ("neighbours", "brand", "popularity", "recent", "category")  # centroid stays 1: it sets the scale


async def tune(
    personalizer: Personalizer, release: Release, c: Cases, start: PersonalWeights, *, rounds: int, quiet: bool
) -> tuple[PersonalWeights, list[dict[str, Any]]]:
    """Coordinate ascent on NDCG@10: per round, each weight in TUNED tried at a few multiples of its value."""
    item_ids = release.catalog.item_ids

    def ndcg(runs: Mapping[str, Sequence[str]]) -> float:
        return float(score(runs, c, item_ids)[f"ndcg@{K}"])

    best = start
    best_ndcg = ndcg((await direct_runs(personalizer, release, c, {"start": best}, exclude=True, quiet=quiet))["start"])
    steps: list[dict[str, Any]] = [{"weights": dataclasses.asdict(best), "ndcg@10": best_ndcg}]
    for _ in range(rounds):
        for name in TUNED:
            value = best.of(name)
            tries = sorted({0.0, value * 0.5, value * 1.5, value * 2.0} if value else {0.1, 0.3, 1.0})
            variants = {f"{name}={v:g}": with_weights(best, {name: v}) for v in tries if v != value}
            runs = await direct_runs(personalizer, release, c, variants, exclude=True, quiet=quiet)
            for label, variant in variants.items():
                value_ndcg = ndcg(runs[label])
                steps.append({"weights": dataclasses.asdict(variant), "ndcg@10": value_ndcg})
                if value_ndcg > best_ndcg + 1e-4:  # a change must earn its keep
                    best, best_ndcg = variant, value_ndcg
            if not quiet:
                print(f"  {name}: best {best.of(name):g}, NDCG@10 {best_ndcg:.4f}", file=sys.stderr)
    return best, steps


def parse_weights(text: str) -> dict[str, float]:
    result = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in {f.name for f in dataclasses.fields(PersonalWeights)}:
            raise SystemExit(
                f"--weights: unknown weight {name!r}; known: {[f.name for f in dataclasses.fields(PersonalWeights)]}"
            )
        result[name] = float(value)
    return result


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    ds = load(args.data)
    c = cases(ds, args.split)
    if args.limit:
        c = dataclasses.replace(
            c, users=c.users[: args.limit], histories=c.histories[: args.limit], targets=c.targets[: args.limit]
        )
    embeddings = item_embeddings(ds.texts)
    neighbours = ItemNeighbours.build(c.training, len(ds.item_ids))
    release = build_release(ds, embeddings, neighbours, args.data)
    weights = with_weights(PersonalWeights(), parse_weights(args.weights or ""))
    depth = args.depth or len(ds.item_ids)
    exclude = not args.keep_purchased
    result: dict[str, Any] = {
        "data": str(args.data),
        "split": args.split,
        "items": len(ds.item_ids),
        "depth": depth,
        "exclude_purchased": exclude,
        "weights": dataclasses.asdict(weights),
        "neighbours": {"entries": len(neighbours.indices), "training_sequences": len(c.training)},
    }
    with tempfile.TemporaryDirectory(prefix="ranker-profiles-") as state:
        # durable=False: nothing to recover here, and an fsync per user would only cost time.
        store = EmbeddedProfileStore(Path(state) / "profiles.sqlite3", ttl_s=1e9, dedup_ttl_s=1e9, durable=False)
        personalizer = Personalizer(store=store, weights=weights, timeout_s=60.0)
        asyncio.run(replay(personalizer, release, c, quiet=args.quiet))
        ranker = recommender(release, personalizer, depth)
        runs = asyncio.run(recommend(ranker, c, exclude_purchased=exclude, desc="recommend", quiet=args.quiet))
        result["personalized"] = score(runs, c, ds.item_ids)
        result["popularity"] = score(popularity_runs(c, ds.item_ids, exclude_purchased=exclude), c, ds.item_ids)
        if args.tune:
            if args.split == "valid":
                raise SystemExit("--tune refuses the valid split: choose weights on --split holdout")
            tuned, steps = asyncio.run(tune(personalizer, release, c, weights, rounds=args.tune, quiet=args.quiet))
            result["tuned"] = {"weights": dataclasses.asdict(tuned), "steps": steps}
        if args.ablation:
            variants = {"default": weights, **ablation_variants(weights)}
            direct = asyncio.run(direct_runs(personalizer, release, c, variants, exclude=exclude, quiet=args.quiet))
            same = sum(direct["default"][u] == runs[u] for u in runs)
            result["ablation_agrees_with_pipeline"] = same / max(1, len(runs))
            rows = [{"variant": label, **score(v, c, ds.item_ids)} for label, v in direct.items()]
            keep = asyncio.run(
                direct_runs(personalizer, release, c, {"default": weights}, exclude=not exclude, quiet=args.quiet)
            )
            label = f"default, exclude_purchased={not exclude}"
            rows.append({"variant": label, **score(keep["default"], c, ds.item_ids)})
            result["ablation"] = rows
        asyncio.run(store.close())
    result["seconds"] = time.perf_counter() - started
    return result


def print_table(result: Mapping[str, Any]) -> None:
    print(
        f"{result['data']} split {result['split']}: {result['personalized']['users']} users, {result['items']} items, "
        f"exclude_purchased={result['exclude_purchased']}"
    )
    rows = [("personalized", result["personalized"]), ("popularity", result["popularity"])]
    rows += [(r["variant"], r) for r in result.get("ablation", [])]
    print(f"{'':<40} {'NDCG@10':>24} {'Recall@10':>24}")
    if "ablation_agrees_with_pipeline" in result:
        agree = result["ablation_agrees_with_pipeline"]
        print(f"(ablation rows scored directly; the same top 10 as the pipeline for {agree:.1%} of users)")
    if "tuned" in result:
        print(f"tuned weights: {json.dumps(result['tuned']['weights'])}")
    for label, row in rows:
        cells = [
            f"{row[m]:.4f} [{row['ci95'][m][0]:.4f}, {row['ci95'][m][1]:.4f}]" for m in (f"ndcg@{K}", f"recall@{K}")
        ]
        print(f"{label:<40} " + " ".join(f"{cell:>24}" for cell in cells))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m offline.evaluate personalization",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the amazon_scientific folder")
    parser.add_argument("--split", choices=("valid", "holdout"), default="valid")
    parser.add_argument("--limit", type=int, default=0, help="only the first N users")
    parser.add_argument("--depth", type=int, default=0, help="candidates per profile retriever (default: all items)")
    parser.add_argument("--weights", help="override scorer weights, e.g. 'neighbours=5,brand=0.2'")
    parser.add_argument("--keep-purchased", action="store_true", help="do not drop the history from the results")
    parser.add_argument("--ablation", action="store_true", help="also score each component alone and each left out")
    parser.add_argument(
        "--tune", type=int, default=0, metavar="ROUNDS", help="coordinate ascent on the weights (holdout split only)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "Scientific.text").is_file():
        print(f"error: no Scientific.text in {args.data} (expected ../shared/data/amazon_scientific)", file=sys.stderr)
        return 2
    result = evaluate(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0
