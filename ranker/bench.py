"""`python -m ranker.bench`: drive real Rank traffic at several concurrencies and print latency and QPS.

    python -m ranker.bench --target localhost:50051 --queries examples/judgments.csv \\
        --concurrency 1,16,64 --duration 20 --json
    # two servers (say batching on and off) measured in alternation, 8 rounds per level
    python -m ranker.bench --target localhost:50051 --compare localhost:50052 --queries ... \\
        --concurrency 1,16 --duration 5 --rounds 8 --json

    # several servers on one port: spread the clients over 16 connections
    python -m ranker.bench --target localhost:50051 --queries ... --concurrency 16 --channels 16

Queries come from a text file (one per line) or from a judgments CSV's query/search_term column.
Each concurrency level runs closed-loop clients for --duration seconds after a short warm-up, --rounds
times; the summary of a level is the median of its rounds. On a shared machine whose speed drifts from
minute to minute, --compare is the way to tell two configurations apart: the servers take turns
(A B, then B A, ...), so both see the same minutes, and each round gives a paired ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypedDict

import grpc
import numpy as np

from ranker.v1 import ranker_pb2, ranker_pb2_grpc


def load_queries(path: Path, limit: int) -> list[str]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            column = "query" if "query" in (reader.fieldnames or []) else "search_term"
            queries = list(dict.fromkeys(row[column] for row in reader if row.get(column)))
    else:
        queries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not queries:
        raise SystemExit(f"no queries in {path}")
    return queries[:limit]


class Summary(TypedDict):
    """One run of one concurrency level."""

    concurrency: int
    requests: int
    qps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    errors_by_code: dict[str, int]
    degraded: int
    stage_p50_ms: dict[str, float]


@dataclass
class LevelResult:
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    degraded: int = 0
    seconds: float = 0.0
    stages_ms: dict[str, list[float]] = field(default_factory=dict)  # the server's own per-stage timings

    def summary(self) -> Summary:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "concurrency": self.concurrency,
            "requests": len(self.latencies_ms),
            "qps": len(self.latencies_ms) / self.seconds if self.seconds else 0.0,
            "p50_ms": float(np.percentile(lat, 50)),
            "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)),
            "errors": sum(self.errors.values()),
            "errors_by_code": dict(self.errors),
            "degraded": self.degraded,
            "stage_p50_ms": {name: float(np.median(values)) for name, values in self.stages_ms.items()},
        }


async def _client(
    stub: ranker_pb2_grpc.RankerStub, queries: Sequence[str], offset: int, stop_at: float, top_k: int, out: LevelResult
) -> None:
    i = offset
    while time.perf_counter() < stop_at:
        request = ranker_pb2.RankRequest(query=queries[i % len(queries)], top_k=top_k)
        i += 1
        start = time.perf_counter()
        try:
            response = await stub.Rank(request, timeout=10.0)
        except grpc.aio.AioRpcError as e:
            out.errors[e.code().name] += 1
            continue
        out.latencies_ms.append((time.perf_counter() - start) * 1000.0)
        out.degraded += int(response.degraded)
        for timing in response.timings:
            out.stages_ms.setdefault(timing.stage, []).append(timing.millis)


async def run_level(
    target: str, queries: Sequence[str], concurrency: int, duration: float, top_k: int, channels: int = 1
) -> LevelResult:
    """One level: `concurrency` closed-loop clients over `channels` connections (client i on channel i mod n)."""
    result = LevelResult(concurrency)
    # Each channel its own subchannel pool, hence its own TCP connection: several rankers listening on one
    # port (SO_REUSEPORT) share connections, not calls, as they would share many callers' connections.
    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(channels)
    ]
    try:
        stubs = [ranker_pb2_grpc.RankerStub(channel) for channel in opened]
        warm = LevelResult(concurrency)
        warm_until = time.perf_counter() + min(2.0, duration / 5)
        await asyncio.gather(
            *(_client(stubs[c % channels], queries, c * 997, warm_until, top_k, warm) for c in range(concurrency))
        )
        start = time.perf_counter()
        stop_at = start + duration
        await asyncio.gather(
            *(_client(stubs[c % channels], queries, c * 7919, stop_at, top_k, result) for c in range(concurrency))
        )
        result.seconds = time.perf_counter() - start
    finally:
        for channel in opened:
            await channel.close()
    return result


Measure = Literal["qps", "p50_ms", "p95_ms", "p99_ms"]
MEDIAN_FIELDS: tuple[Measure, ...] = ("qps", "p50_ms", "p95_ms", "p99_ms")
# the measures compared by `paired`, each with whether higher is better
PAIRED_FIELDS: tuple[tuple[Measure, bool], ...] = (("qps", True), ("p50_ms", False), ("p99_ms", False))


def combine(rounds: Sequence[Summary]) -> dict[str, object]:
    """One level's summary over its rounds: medians of QPS and latency percentiles (each round's value kept in
    `<key>_runs`), totals of requests, errors and degraded answers, the median of each stage's per-round p50."""
    out: dict[str, object] = {"concurrency": rounds[0]["concurrency"], "rounds": len(rounds)}
    out["requests"] = sum(r["requests"] for r in rounds)
    for key in MEDIAN_FIELDS:
        values = [r[key] for r in rounds]
        out[key] = float(np.median(values))
        out[f"{key}_runs"] = [round(v, 2) for v in values]
    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r["errors_by_code"])
    out["errors"] = sum(errors.values())
    out["errors_by_code"] = dict(errors)
    out["degraded"] = sum(r["degraded"] for r in rounds)
    stages: dict[str, list[float]] = {}
    for r in rounds:
        for name, ms in r["stage_p50_ms"].items():
            stages.setdefault(name, []).append(ms)
    out["stage_p50_ms"] = {name: float(np.median(values)) for name, values in stages.items()}
    return out


def paired(target: Sequence[Summary], compare: Sequence[Summary]) -> dict[str, object]:
    """Per-round ratios compare / target of one level's rounds (taken in the same minutes): their medians, and in
    how many rounds the compared server was better (more QPS, lower p50 / p99)."""
    out: dict[str, object] = {"concurrency": target[0]["concurrency"], "rounds": len(target)}
    for key, higher_is_better in PAIRED_FIELDS:
        a = np.array([r[key] for r in target], dtype=np.float64)
        b = np.array([r[key] for r in compare], dtype=np.float64)
        ratios = np.divide(b, a, out=np.full(len(a), np.nan), where=a > 0)
        out[f"{key}_ratio"] = float(np.nanmedian(ratios)) if np.isfinite(ratios).any() else None
        out[f"{key}_compare_better"] = int(np.sum(b > a) if higher_is_better else np.sum(b < a))
    return out


async def measure(
    targets: Sequence[str],
    queries: Sequence[str],
    concurrency: int,
    duration: float,
    top_k: int,
    rounds: int,
    channels: int = 1,
) -> list[list[Summary]]:
    """Each target's summaries of `rounds` runs of one level, the targets taking turns in an order that flips
    every round (A B, B A, A B, ...)."""
    runs: list[list[Summary]] = [[] for _ in targets]
    for r in range(rounds):
        order = range(len(targets)) if r % 2 == 0 else reversed(range(len(targets)))
        for i in order:
            level = await run_level(targets[i], queries, concurrency, duration, top_k, channels)
            runs[i].append(level.summary())
    return runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ranker.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--queries", type=Path, required=True, help="text file (one query per line) or judgments CSV")
    parser.add_argument("--max-queries", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="runs per level (and per target); medians are reported")
    parser.add_argument(
        "--compare", metavar="HOST:PORT", help="a second server, measured in alternation with --target (paired ratios)"
    )
    parser.add_argument(
        "--channels", type=int, default=1, help="connections the clients share (several servers on one port)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.channels < 1:
        parser.error(f"--channels must be >= 1, got {args.channels}")
    return args


def _print_level(target: str, summary: Summary | dict[str, object]) -> None:
    print(
        f"{target}  c={summary['concurrency']:<3} qps {summary['qps']:8.1f}  p50 {summary['p50_ms']:7.2f} ms  "
        f"p95 {summary['p95_ms']:7.2f} ms  p99 {summary['p99_ms']:7.2f} ms  errors {summary['errors']}  "
        f"degraded {summary['degraded']}",
        file=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    queries = load_queries(args.queries, args.max_queries)
    levels = [int(c) for c in args.concurrency.split(",")]
    targets = [args.target] if args.compare is None else [args.target, args.compare]
    results: list[list[Summary | dict[str, object]]] = [[] for _ in targets]
    pairs = []
    for level in levels:
        runs = asyncio.run(
            measure(targets, queries, level, args.duration, args.top_k, args.rounds, min(args.channels, level))
        )
        for i, target in enumerate(targets):
            results[i].append(runs[i][0] if args.rounds == 1 else combine(runs[i]))
            if not args.json:
                _print_level(target, results[i][-1])
        if args.compare is not None:
            pairs.append(paired(runs[0], runs[1]))
            if not args.json:
                p = pairs[-1]
                ratios = "  ".join(f"{key} x{p[f'{key}_ratio'] or float('nan'):.3f}" for key, _ in PAIRED_FIELDS)
                better = f"more QPS in {p['qps_compare_better']}/{args.rounds} rounds"
                print(f"compare/target  c={level:<3} {ratios}  ({better})", file=sys.stderr)
    if args.json:
        out: dict[str, object] = {"target": args.target, "queries": len(queries), "levels": results[0]}
        if args.compare is not None:
            out["compare"] = {"target": args.compare, "levels": results[1]}
            out["paired"] = pairs
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
