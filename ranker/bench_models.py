"""`python -m ranker.bench_models`: latency of each Triton model alone, as the service calls it.

    python -m ranker.bench_models --release releases/homedepot --rows 200 --repeats 500 --json

Starts an embedded CPU tritonserver on the release (or uses --triton-url), then times
TritonScorer.score on `rows` feature rows and TritonEncoder.encode on one query, sequentially:
client round trip percentiles, Triton's own per-request compute time (its statistics), and the
same ONNX file run in-process with ONNX Runtime for reference.
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
    with LocalTritonServer(args.release / "triton_models") as server:
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
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ranker.bench_models", description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, required=True)
    parser.add_argument("--triton-url", help="an already running Triton serving the release (default: start one)")
    parser.add_argument("--rows", type=int, default=200, help="candidate rows per ranker call")
    parser.add_argument("--repeats", type=int, default=500)
    parser.add_argument("--query", default="cordless drill with battery")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with triton_url(args) as url:
        result = asyncio.run(bench(url, args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
