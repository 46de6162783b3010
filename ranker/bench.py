"""`python -m ranker.bench`: drive real Rank traffic at several concurrencies and print latency and QPS.

    python -m ranker.bench --target localhost:50051 --queries examples/judgments.csv \\
        --concurrency 1,16,64 --duration 20 --json

Queries come from a text file (one per line) or from a judgments CSV's query/search_term column.
Each concurrency level runs closed-loop clients for --duration seconds after a short warm-up.
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


@dataclass
class LevelResult:
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    degraded: int = 0
    seconds: float = 0.0
    stages_ms: dict[str, list[float]] = field(default_factory=dict)  # the server's own per-stage timings

    def summary(self) -> dict[str, object]:
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


async def run_level(target: str, queries: Sequence[str], concurrency: int, duration: float, top_k: int) -> LevelResult:
    result = LevelResult(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        warm = LevelResult(concurrency)
        warm_until = time.perf_counter() + min(2.0, duration / 5)
        await asyncio.gather(*(_client(stub, queries, c * 997, warm_until, top_k, warm) for c in range(concurrency)))
        start = time.perf_counter()
        stop_at = start + duration
        await asyncio.gather(*(_client(stub, queries, c * 7919, stop_at, top_k, result) for c in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ranker.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--queries", type=Path, required=True, help="text file (one query per line) or judgments CSV")
    parser.add_argument("--max-queries", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per concurrency level")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    queries = load_queries(args.queries, args.max_queries)
    levels = [int(c) for c in args.concurrency.split(",")]
    results = []
    for level in levels:
        summary = asyncio.run(run_level(args.target, queries, level, args.duration, args.top_k)).summary()
        results.append(summary)
        if not args.json:
            print(
                f"c={level:<3} qps {summary['qps']:8.1f}  p50 {summary['p50_ms']:7.2f} ms  "
                f"p95 {summary['p95_ms']:7.2f} ms  p99 {summary['p99_ms']:7.2f} ms  errors {summary['errors']}  "
                f"degraded {summary['degraded']}",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps({"target": args.target, "queries": len(queries), "levels": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
