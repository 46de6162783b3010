"""`python -m ranker serve` runs the service; `python -m ranker query` calls Rank and prints the result."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from ranker.config import load_settings
    from ranker.server import serve

    settings = load_settings(release=args.release, port=args.port, host=args.host, triton_url=args.triton_url)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(settings))
    return 0


def _query(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from ranker.v1 import ranker_pb2, ranker_pb2_grpc

    request = ranker_pb2.RankRequest(query=args.text, top_k=args.top_k, candidate_ids=args.candidate or [])
    with grpc.insecure_channel(args.target) as channel:
        try:
            response = ranker_pb2_grpc.RankerStub(channel).Rank(request, timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
        return 0
    timings = ", ".join(f"{t.stage} {t.millis:.1f}" for t in response.timings)
    print(f"release {response.release.release_id}  candidates {response.candidates}  ms: {timings}")
    if response.degraded:
        print(f"DEGRADED: {response.degraded_reason}")
    for i, item in enumerate(response.items, 1):
        print(f"{i:3d}. {item.score:8.4f}  {item.item_id:>10}  {item.title}")
    return 0


def _health(args: argparse.Namespace) -> int:
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + args.wait
    while True:
        with grpc.insecure_channel(args.target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    print(f"{args.target}: SERVING")
                    return 0
            except grpc.RpcError:
                pass
        if time.monotonic() >= deadline:
            print(f"{args.target}: not serving after {args.wait:.0f}s", file=sys.stderr)
            return 1
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ranker", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve ranker.v1.Ranker over gRPC (settings: RANKER_* env)")
    serve.add_argument("--release", type=Path, help="release folder (RANKER_RELEASE)")
    serve.add_argument("--port", type=int, help="gRPC port (RANKER_PORT, default 50051)")
    serve.add_argument("--host", help="bind address (RANKER_HOST, default 0.0.0.0)")
    serve.add_argument("--triton-url", help="Triton gRPC host:port, or 'embedded' (RANKER_TRITON_URL)")
    serve.set_defaults(func=_serve)

    query = commands.add_parser("query", help="call Rank on a running server and print the ranked items")
    query.add_argument("text", help="the shopper's query")
    query.add_argument("--target", default="localhost:50051", help="host:port of the ranker")
    query.add_argument("--top-k", type=int, default=10)
    query.add_argument("--candidate", action="append", help="rerank exactly these item ids (repeatable)")
    query.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    query.add_argument("--json", action="store_true", help="print the whole response as JSON")
    query.set_defaults(func=_query)

    health = commands.add_parser("health", help="check (or wait for) a ranker's gRPC health status")
    health.add_argument("--target", default="localhost:50051", help="host:port of the ranker")
    health.add_argument("--wait", type=float, default=0.0, help="keep trying for this many seconds")
    health.set_defaults(func=_health)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
