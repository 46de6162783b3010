"""`python -m ranker.bench_catalog`: time UpsertItems / DeleteItems on a running server, and Rank around them.

    python -m ranker.bench_catalog --target localhost:50051 --titles ../shared/data/homedepot/products.csv \\
        --batches 1,100 --rounds 20 --json
    python -m ranker.bench_catalog --release releases/homedepot-ft --titles ../shared/data/homedepot/products.csv

Each round upserts a batch of new items (ids bench-<batch>-<round>-<i>, titles sampled from --titles),
waits for the reply, then counts whether a Rank for the batch's first title has it in its top 10.
Rank latency is measured before the upserts, while they run (from a second client) and after them
(the overlay and the dead-row mask are then in the path); the bench's items are deleted at the end
(unless --keep). Run it against a server with a scratch RANKER_STATE_DIR: the changes are journaled.
With --replica (another server sharing --target's RANKER_CATALOG_STORE), each round also times how long
after the upsert's reply that replica serves the batch: it is asked to Rank the batch's last item by id
every 2 ms until it stops refusing the id as unknown.
With --release instead of a server, it times the overlay in-process (ranker.catalog_overlay): building
the next snapshot, retrieval over 0 / 2,000 / 10,000 appended rows, and a full BM25 rebuild for comparison.
With --release and --log-store REDIS_URL, it times the shared catalog log (ranker.catalog_log) instead:
--log-items items each upserted --log-versions times in batches of --log-batch, then a replica's start
(replaying the log onto the release), the log's compaction and the start again; the stream's size in
Redis before and after. Its key (bench-<pid>:catalog:log) is deleted at the end.

    python -m ranker.bench_catalog --release releases/homedepot-v2 --titles ../shared/data/homedepot/products.csv \
        --log-store redis://localhost:6379/0 --log-items 2000 --log-versions 10 --json
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from ranker.v1 import ranker_pb2, ranker_pb2_grpc


def load_titles(path: Path, n: int, seed: int) -> list[str]:
    """n titles sampled (seeded) from a catalog CSV's title / product_title column: real lengths and words."""
    rng = np.random.default_rng(seed)
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        column = "title" if "title" in (reader.fieldnames or []) else "product_title"
        titles = [row[column] for row in reader if row.get(column)]
    if not titles:
        raise SystemExit(f"no titles in {path}")
    return [titles[int(i)] for i in rng.choice(len(titles), size=n, replace=len(titles) < n)]


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(samples_ms, dtype=np.float64)
    return {"n": len(values), **{f"p{q}_ms": round(float(np.percentile(values, q)), 1) for q in (50, 90, 100)}}


def rank_latencies(stub: ranker_pb2_grpc.RankerStub, queries: Sequence[str]) -> list[float]:
    out = []
    for query in queries:
        start = time.perf_counter()
        stub.Rank(ranker_pb2.RankRequest(query=query, top_k=20), timeout=30)
        out.append((time.perf_counter() - start) * 1000.0)
    return out


def replica_lag_ms(stub: ranker_pb2_grpc.RankerStub, item_id: str, timeout_s: float = 30.0) -> float:
    """Milliseconds until `stub`'s server knows `item_id` (a Rank naming it is no longer INVALID_ARGUMENT)."""
    start = time.perf_counter()
    request = ranker_pb2.RankRequest(query="", top_k=1, candidate_ids=[item_id])
    while True:
        try:
            stub.Rank(request, timeout=5)
            return (time.perf_counter() - start) * 1000.0
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.INVALID_ARGUMENT or time.perf_counter() - start > timeout_s:
                raise
        time.sleep(0.002)


class RankLoop(threading.Thread):
    """Rank calls back to back on their own channel while the upserts run: what shoppers see meanwhile."""

    def __init__(self, target: str, queries: Sequence[str]) -> None:
        super().__init__(daemon=True)
        self.target, self.queries = target, queries
        self.latencies_ms: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = ranker_pb2_grpc.RankerStub(channel)
            i = 0
            while not self.stop.is_set():
                self.latencies_ms += rank_latencies(stub, [self.queries[i % len(self.queries)]])
                i += 1


def run(args: argparse.Namespace) -> dict[str, object]:
    batches = [int(b) for b in args.batches.split(",")]
    titles = load_titles(args.titles, sum(batches) * args.rounds + args.rank_queries, args.seed)
    queries = [" ".join(t.split()[:3]) for t in titles[: args.rank_queries]]
    pool = iter(titles[args.rank_queries :])
    report: dict[str, object] = {"target": args.target, "batches": {}}
    created: list[str] = []
    with grpc.insecure_channel(args.target) as channel, grpc.insecure_channel(args.replica or args.target) as other:
        stub = ranker_pb2_grpc.RankerStub(channel)
        replica = ranker_pb2_grpc.RankerStub(other) if args.replica else None
        rank_latencies(stub, queries[:5])  # warm-up
        report["rank_before"] = percentiles(rank_latencies(stub, queries))
        for batch in batches:
            latencies, found, lags = [], 0, []
            loop = RankLoop(args.target, queries)
            loop.start()
            for r in range(args.rounds):
                items = [
                    ranker_pb2.CatalogItem(item_id=f"bench-{batch}-{r}-{i}", title=next(pool), price=10.0 + i)
                    for i in range(batch)
                ]
                start = time.perf_counter()
                reply = stub.UpsertItems(ranker_pb2.UpsertItemsRequest(items=items), timeout=120)
                latencies.append((time.perf_counter() - start) * 1000.0)
                assert reply.inserted + reply.updated == batch
                created += [item.item_id for item in items]
                if replica is not None:
                    lags.append(replica_lag_ms(replica, items[-1].item_id))
                ranked = stub.Rank(ranker_pb2.RankRequest(query=items[0].title, top_k=10), timeout=30)
                found += int(items[0].item_id in [i.item_id for i in ranked.items])
            loop.stop.set()
            loop.join()
            summary = {
                **percentiles(latencies),
                "first_item_in_top10_of_its_title": found / args.rounds,
                "rank_meanwhile": percentiles(loop.latencies_ms),
            }
            if lags:
                summary["replica_serves_it_after_reply"] = percentiles(lags)
            report["batches"][str(batch)] = summary  # type: ignore[index]
            if not args.json:
                print(f"upsert {batch:>4} items: {report['batches'][str(batch)]}", file=sys.stderr)  # type: ignore[index]
        report["rank_after"] = percentiles(rank_latencies(stub, queries))
        if not args.keep:
            start = time.perf_counter()
            deleted = stub.DeleteItems(ranker_pb2.DeleteItemsRequest(item_ids=created), timeout=60).deleted
            report["delete"] = {"items": deleted, "ms": round((time.perf_counter() - start) * 1000.0, 1)}
            report["rank_after_delete"] = percentiles(rank_latencies(stub, queries))
    return report


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def run_in_process(args: argparse.Namespace) -> dict[str, object]:
    """No server, no Triton: the cost of building the next snapshot, of retrieval over an overlay, and of the
    alternative (rebuilding the release's BM25 index). Embeddings are the release's own, reused."""
    from ranker.catalog_overlay import CatalogSnapshot
    from ranker.domain import CatalogItem
    from ranker.release import Release
    from ranker.retrieval import LexicalIndex

    release = Release.load(args.release)
    rng = np.random.default_rng(args.seed)
    batches = [int(b) for b in args.batches.split(",")]
    titles = load_titles(args.titles, 12_000 + sum(batches) * args.rounds, args.seed)
    pool = itertools.cycle(titles)
    vectors = np.asarray(release.retriever.dense.embeddings)

    def upserts(n: int, tag: str) -> list[tuple[CatalogItem, np.ndarray]]:
        return [
            (CatalogItem(item_id=f"bench-{tag}-{i}", title=next(pool)), vectors[int(rng.integers(len(vectors)))])
            for i in range(n)
        ]

    report: dict[str, object] = {"release": release.manifest.release_id, "items": len(release.catalog)}
    start = time.perf_counter()
    snapshot = CatalogSnapshot.of(release)
    report["open_ms"] = round(_ms(start), 1)
    start = time.perf_counter()
    snapshot, _ = snapshot.apply(upserts(1, "first"))
    report["first_upsert_ms"] = round(_ms(start), 1)  # copies every embedding into the growable buffer
    for batch in batches:
        samples = []
        for r in range(args.rounds):
            items = upserts(batch, f"{batch}-{r}")
            start = time.perf_counter()
            snapshot, _ = snapshot.apply(items)
            samples.append(_ms(start))
        report[f"upsert_{batch}"] = percentiles(samples)
    samples = []
    for r in range(args.rounds):
        start = time.perf_counter()
        snapshot, _ = snapshot.apply([], [f"bench-1-{r}-0"])
        samples.append(_ms(start))
    report["delete_1"] = percentiles(samples)
    start = time.perf_counter()
    LexicalIndex.build(release.analyzer.analyze_many(release.catalog.titles))
    report["bm25_full_rebuild_ms"] = round(_ms(start), 1)
    queries = [
        (release.analyzer.analyze(" ".join(t.split()[:3])), vectors[int(rng.integers(len(vectors)))])
        for t in titles[: args.rank_queries]
    ]
    for appended in (0, 2000, 10_000):
        overlay = CatalogSnapshot.of(release)
        if appended:
            deleted = rng.choice(len(release.catalog), appended // 5, replace=False)
            overlay, _ = overlay.apply(
                upserts(appended, f"overlay-{appended}"), [release.catalog.item_ids[int(r)] for r in deleted]
            )
        serving = overlay.release
        samples = []
        for tokens, embedding in queries:
            start = time.perf_counter()
            allowed = serving.catalog.mask(categories=frozenset(), min_price=None, max_price=None)
            serving.retriever.retrieve(tokens, embedding, dense_k=400, lexical_k=400, allowed=allowed)
            samples.append(_ms(start))
        report[f"retrieve_with_{appended}_appended_{appended // 5}_deleted"] = percentiles(samples)
    return report


async def run_log(args: argparse.Namespace) -> dict[str, object]:
    """The shared catalog log's replay and compaction on a real Redis (see the module docstring)."""
    import os

    import redis

    from ranker.catalog_journal import Upsert
    from ranker.catalog_log import RedisCatalogLog
    from ranker.domain import CatalogItem
    from ranker.live_catalog import LiveCatalog, encoder_fingerprint, item_tokenizer
    from ranker.models import ONNX_FILE, OnnxEncoder, OnnxScorer, QueryTokenizer, encoder_cpu_onnx
    from ranker.pipeline import PipelineSettings, Ranker
    from ranker.release import ENCODER_MODEL, MODEL_REPOSITORY, RANKER_MODEL, TOKENIZER, Release

    release = Release.load(args.release)
    manifest = release.manifest
    repo = release.path / MODEL_REPOSITORY
    ranker = Ranker(
        release,
        encoder=OnnxEncoder(encoder_cpu_onnx(repo / ENCODER_MODEL / manifest.encoder.version)),
        scorer=OnnxScorer(repo / RANKER_MODEL / manifest.ranker.version / ONNX_FILE),
        tokenizer=QueryTokenizer(release.path / TOKENIZER, manifest.max_query_tokens),
        settings=PipelineSettings.for_release(manifest),
    )
    prefix = f"bench-{os.getpid()}"
    shared = RedisCatalogLog.from_url(args.log_store, timeout_s=30.0, block_s=1.0, prefix=prefix)
    sync = redis.Redis.from_url(args.log_store)
    rng = np.random.default_rng(args.seed)
    titles = load_titles(args.titles, args.log_items, args.seed)
    vectors = np.asarray(release.retriever.dense.embeddings)
    fingerprint = encoder_fingerprint(manifest)
    report: dict[str, object] = {"release": manifest.release_id, "items": args.log_items}
    try:
        start = time.perf_counter()
        for version in range(args.log_versions):
            for first in range(0, args.log_items, args.log_batch):
                ids = range(first, min(first + args.log_batch, args.log_items))
                items = tuple(CatalogItem(item_id=f"bench-{i}", title=f"{titles[i]} v{version}") for i in ids)
                rows = rng.integers(len(vectors), size=len(items))
                await shared.append(
                    Upsert(items, vectors[rows].astype(np.float32)), encoder=fingerprint, dim=vectors.shape[1]
                )
        report["write_s"] = round(time.perf_counter() - start, 1)

        async def replica_start() -> dict[str, object]:
            started = time.perf_counter()
            live = await LiveCatalog.open_shared(ranker, tokenizer=item_tokenizer(release), shared=shared)
            took = _ms(started)
            live.close()
            return {
                "entries": await shared.length(),
                "stream_mb": round(int(sync.memory_usage(shared.key, samples=0) or 0) / 1e6, 1),
                "replica_start_ms": round(took, 1),
            }

        report["before"] = await replica_start()
        start = time.perf_counter()
        done = await shared.compact()
        report["compaction_ms"] = round(_ms(start), 1)
        assert done is not None
        report["records_before"], report["records_after"] = done.records_before, done.records_after
        report["after"] = await replica_start()
    finally:
        sync.delete(shared.key)
        await shared.close()
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ranker.bench_catalog", description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument(
        "--replica", help="another server sharing --target's RANKER_CATALOG_STORE: time until it serves each batch"
    )
    parser.add_argument("--release", type=Path, help="no server: time the overlay itself on this release, in-process")
    parser.add_argument("--log-store", help="with --release: time the shared catalog log on this Redis URL")
    parser.add_argument("--log-items", type=int, default=2000, help="--log-store: distinct items")
    parser.add_argument("--log-versions", type=int, default=10, help="--log-store: upserts of each item")
    parser.add_argument("--log-batch", type=int, default=20, help="--log-store: items per upsert")
    parser.add_argument("--titles", type=Path, required=True, help="catalog CSV to sample the items' titles from")
    parser.add_argument("--batches", default="1,100", help="comma-separated batch sizes")
    parser.add_argument("--rounds", type=int, default=20, help="upserts per batch size")
    parser.add_argument("--rank-queries", type=int, default=50, help="Rank calls before and after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="leave the items in the catalog (default: delete them)")
    parser.add_argument("--json", action="store_true", help="no progress lines on stderr, only the JSON report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.release is None:
        report = run(args)
    elif args.log_store:
        report = asyncio.run(run_log(args))
    else:
        report = run_in_process(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
