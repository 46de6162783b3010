"""`python -m ranker serve` runs the service; `query` calls Rank and prints the result; `health` checks a ranker;
`admin load-release` swaps a running ranker to another release; `catalog-log-position` prints where the shared
catalog log stands, for `offline.export --catalog-log-through`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _serve(args: argparse.Namespace) -> int:
    from ranker.config import load_settings
    from ranker.logs import configure_logging
    from ranker.server import serve

    settings = load_settings(release=args.release, port=args.port, host=args.host, triton_url=args.triton_url)
    worker = {"worker": settings.worker_index} if settings.worker_index is not None else None
    configure_logging(settings.log_level, settings.log_format, fields=worker)
    if settings.workers > 1 and settings.worker_index is None:
        from ranker.workers import supervise

        return supervise(settings)
    asyncio.run(serve(settings))
    return 0


def _query(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from ranker.v1 import ranker_pb2, ranker_pb2_grpc

    request = ranker_pb2.RankRequest(query=args.text, top_k=args.top_k, candidate_ids=args.candidate or [])
    response = _call(args, lambda channel: ranker_pb2_grpc.RankerStub(channel).Rank, request)
    if response is None:
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
        with _channel(args) as channel:
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


def _load_release(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from ranker.v1 import ranker_pb2, ranker_pb2_grpc

    request = ranker_pb2.LoadReleaseRequest(path=str(args.path))
    response = _call(args, lambda channel: ranker_pb2_grpc.RankerAdminStub(channel).LoadRelease, request)
    if response is None:
        return 1
    if args.json:
        print(json.dumps(json_format.MessageToDict(response), indent=2))
    elif response.previous.release_id == response.current.release_id:
        print(f"release {response.current.release_id} was already serving")
    else:
        print(f"release {response.previous.release_id} -> {response.current.release_id} in {response.millis:.0f} ms")
    return 0


def _catalog_log_position(args: argparse.Namespace) -> int:
    from ranker.config import load_settings
    from ranker.profiles import redacted
    from ranker.server import shared_catalog_log

    async def position() -> dict[str, object]:
        settings = load_settings()
        async with shared_catalog_log(settings) as shared:
            return {
                "store": redacted(settings.catalog_store),
                "key": shared.key,
                "through": await shared.position(),
                "entries": await shared.length(),
            }

    print(json.dumps(asyncio.run(position())))
    return 0


def _call(args: argparse.Namespace, method: Callable[[Any], Callable[..., Any]], request: Any) -> Any | None:
    """One unary call with the CLI's deadline and token; on failure prints the status and returns None."""
    import grpc

    with _channel(args) as channel:
        try:
            return method(channel)(request, timeout=args.timeout, metadata=_token_metadata(args))
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            return None


def _channel(args: argparse.Namespace) -> Any:
    from ranker.security import client_channel

    return client_channel(
        args.target,
        tls=args.tls,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        server_name=args.server_name,
    )


def _token_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    from ranker.security import token_metadata

    return token_metadata(args.token_file)


def _client_options(parser: argparse.ArgumentParser, *, token: bool) -> None:
    parser.add_argument("--target", default="localhost:50051", help="host:port of the ranker")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's root CAs")
    parser.add_argument("--ca-file", type=Path, help="PEM CA that signed the server's certificate (implies --tls)")
    parser.add_argument("--cert-file", type=Path, help="PEM client certificate, for mTLS (with --key-file)")
    parser.add_argument("--key-file", type=Path, help="PEM private key of --cert-file")
    parser.add_argument("--server-name", help="name to verify the server's certificate against (default: target host)")
    if token:
        parser.add_argument("--token-file", type=Path, help="file whose first token is sent as 'authorization: Bearer'")


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
    _client_options(query, token=True)
    query.add_argument("--top-k", type=int, default=10)
    query.add_argument("--candidate", action="append", help="rerank exactly these item ids (repeatable)")
    query.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    query.add_argument("--json", action="store_true", help="print the whole response as JSON")
    query.set_defaults(func=_query)

    health = commands.add_parser("health", help="check (or wait for) a ranker's gRPC health status")
    _client_options(health, token=False)
    health.add_argument("--wait", type=float, default=0.0, help="keep trying for this many seconds")
    health.set_defaults(func=_health)

    admin = commands.add_parser("admin", help="operator RPCs (RankerAdmin) on a running server")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    load = admin_commands.add_parser(
        "load-release",
        help="swap the server to the release at PATH: its models loaded into Triton and warmed up, then an atomic "
        "switch; the old release's models are unloaded once its in-flight requests are done",
    )
    load.add_argument("path", type=Path, help="the release folder, as the server sees it")
    _client_options(load, token=True)
    load.add_argument("--timeout", type=float, default=900.0, help="deadline in seconds (the swap finishes anyway)")
    load.add_argument("--json", action="store_true", help="print the whole response as JSON")
    load.set_defaults(func=_load_release)

    position = commands.add_parser(
        "catalog-log-position",
        help="print the shared catalog log's last entry id (RANKER_CATALOG_STORE and its RANKER_* settings): take it "
        "before taking the catalog for offline.export, and pass it as --catalog-log-through",
    )
    position.set_defaults(func=_catalog_log_position)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
