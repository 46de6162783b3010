"""`python -m ranker.bench_models`: latency of each Triton model alone, as the service calls it.

    python -m ranker.bench_models --release releases/homedepot --rows 200 --repeats 500 --json

Starts an embedded CPU tritonserver on the release (or uses --triton-url), then times
TritonScorer.score on `rows` feature rows and TritonEncoder.encode on one query, sequentially:
client round trip percentiles, Triton's own per-request compute time (its statistics), and the
same ONNX file run in-process with ONNX Runtime for reference.

    python -m ranker.bench_models --release R --concurrency 16 --queries Q.csv [--config-name cpu_nobatch]

adds the encoder alone under load: closed-loop clients encoding real queries for --duration
seconds (what Triton's dynamic batching is for; compare --config-name cpu and cpu_nobatch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ranker.bench import load_queries
from ranker.bench_stages import percentiles, time_sync
from ranker.features import NUM_FEATURES
from ranker.models import OnnxEncoder, OnnxScorer, QueryTokenizer, encoder_cpu_onnx
from ranker.release import TOKENIZER, read_manifest
from ranker.triton import TritonEncoder, TritonModels, TritonScorer
from ranker.tritonserver import LocalTritonServer


async def time_async(call: Callable[[], Awaitable[object]], repeats: int) -> list[float]:
    for _ in range(min(20, repeats)):  # warm-up
        await call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - start) * 1000.0)
    return samples


@contextlib.contextmanager
def triton_url(args: argparse.Namespace) -> Iterator[str]:
    if args.triton_url:
        yield args.triton_url
        return
    with LocalTritonServer(args.release / "triton_models", model_config_name=args.config_name) as server:
        yield server.grpc_url


async def bench(url: str, args: argparse.Namespace) -> dict[str, object]:
    manifest = read_manifest(args.release)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(args.rows, NUM_FEATURES)).astype(np.float32)
    tokenizer = QueryTokenizer(args.release / TOKENIZER, manifest.max_query_tokens)
    ids, mask = tokenizer([args.query])
    models = TritonModels(url)
    try:
        # Statistics are cumulative: fresh models (an embedded server) give clean per-request figures.
        scorer = TritonScorer(models, version=manifest.ranker.version)
        encoder = TritonEncoder(models, version=manifest.encoder.version)
        score = await time_async(lambda: scorer.score(rows, timeout=5.0), args.repeats)
        encode = await time_async(lambda: encoder.encode(ids, mask, timeout=5.0), args.repeats)
        triton_ranker = await models.time_per_request_ms(manifest.ranker.name)
        triton_encoder = await models.time_per_request_ms(manifest.encoder.name)
        loaded = await encoder_under_load(encoder, tokenizer, args) if args.concurrency else None
    finally:
        await models.close()
    repo = args.release / "triton_models"
    local_scorer = OnnxScorer(repo / "ranker" / manifest.ranker.version / "model.onnx", threads=1)
    local_encoder = OnnxEncoder(encoder_cpu_onnx(repo / "text_encoder" / manifest.encoder.version), threads=2)
    return {
        "release_id": manifest.release_id,
        "ranker": {
            "rows": args.rows,
            "client": percentiles(score),
            "triton": triton_ranker,
            "onnxruntime_in_process": percentiles(time_sync(lambda: local_scorer.score_sync(rows), args.repeats)),
        },
        "text_encoder": {
            "tokens": int(ids.shape[1]),
            "client": percentiles(encode),
            "triton": triton_encoder,
            "onnxruntime_in_process": percentiles(
                time_sync(lambda: local_encoder.encode_sync(ids, mask), args.repeats)
            ),
            **({"under_load": loaded} if loaded else {}),
        },
    }


async def encoder_under_load(
    encoder: TritonEncoder, tokenizer: QueryTokenizer, args: argparse.Namespace
) -> dict[str, object]:
    """Queries per second and latency of `args.concurrency` clients each encoding one query at a time."""
    queries = load_queries(args.queries, 5000) if args.queries else [args.query]
    batches = [tokenizer([q]) for q in queries]
    latencies: list[float] = []
    stop_at = time.perf_counter() + args.duration

    async def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < stop_at:
            ids, mask = batches[i % len(batches)]
            i += args.concurrency
            start = time.perf_counter()
            await encoder.encode(ids, mask, timeout=10.0)
            latencies.append((time.perf_counter() - start) * 1000.0)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(args.concurrency)))
    seconds = time.perf_counter() - started
    return {
        "concurrency": args.concurrency,
        "queries": len(latencies),
        "qps": len(latencies) / seconds,
        **percentiles(latencies),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ranker.bench_models", description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, required=True)
    parser.add_argument("--triton-url", help="an already running Triton serving the release (default: start one)")
    parser.add_argument("--rows", type=int, default=200, help="candidate rows per ranker call")
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--query", default="cordless drill with battery")
    parser.add_argument("--config-name", default="cpu", help="the models' configs/<name>.pbtxt (embedded server)")
    parser.add_argument("--concurrency", type=int, default=0, help="also drive the encoder with N clients")
    parser.add_argument("--queries", type=Path, help="with --concurrency: queries (text or judgments CSV)")
    parser.add_argument("--duration", type=float, default=10.0, help="with --concurrency: seconds of load")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with triton_url(args) as url:
        result = asyncio.run(bench(url, args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
