"""A real grpc.aio server in a background thread, with fake Ranker / RankerAdmin servicers, health and
reflection: for testing interceptors and credentials through the wire without the pipeline or Triton."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ranker.v1 import ranker_pb2, ranker_pb2_grpc

RANK_TIMINGS = (("encode", 2.0), ("retrieve", 5.0), ("score", 3.0))


class FakeRanker(ranker_pb2_grpc.RankerServicer):
    """Answers Rank from the query text: "boom" raises, "invalid" aborts, "degraded" degrades."""

    async def Rank(self, request: ranker_pb2.RankRequest, context: grpc.aio.ServicerContext) -> Any:
        if request.query == "boom":
            raise RuntimeError("secret internals")
        if request.query == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "query: invalid")
        degraded = request.query == "degraded"
        return ranker_pb2.RankResponse(
            request_id=request.request_id,
            items=[ranker_pb2.RankedItem(item_id="a", score=1.0)],
            release=ranker_pb2.ReleaseInfo(release_id="rel-1", model_versions={"text_encoder": "1", "ranker": "2"}),
            timings=[ranker_pb2.StageTiming(stage=s, millis=ms) for s, ms in RANK_TIMINGS],
            degraded=degraded,
            degraded_reason="text_encoder unavailable (BackendTimeout): lexical retrieval only" if degraded else "",
            candidates=42,
        )

    async def RecordEvents(self, request: ranker_pb2.RecordEventsRequest, context: grpc.aio.ServicerContext) -> Any:
        return ranker_pb2.RecordEventsResponse(applied=len(request.events))

    async def ForgetUser(self, request: ranker_pb2.ForgetUserRequest, context: grpc.aio.ServicerContext) -> Any:
        return ranker_pb2.ForgetUserResponse(existed=True)

    # UpsertItems / DeleteItems: the generated base class answers UNIMPLEMENTED.


class FakeAdmin(ranker_pb2_grpc.RankerAdminServicer):
    async def LoadRelease(self, request: ranker_pb2.LoadReleaseRequest, context: grpc.aio.ServicerContext) -> Any:
        return ranker_pb2.LoadReleaseResponse(millis=1.0)


async def _start(
    interceptors: Sequence[Any], credentials: grpc.ServerCredentials | None
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=list(interceptors))
    ranker_pb2_grpc.add_RankerServicer_to_server(FakeRanker(), server)
    ranker_pb2_grpc.add_RankerAdminServicer_to_server(FakeAdmin(), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (
        ranker_pb2.DESCRIPTOR.services_by_name["Ranker"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    address = "127.0.0.1:0"
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


@contextmanager
def running_server(
    interceptors: Sequence[Any] = (), credentials: grpc.ServerCredentials | None = None
) -> Iterator[str]:
    """Serve the fakes on 127.0.0.1 from a thread with its own event loop; yields "127.0.0.1:port"."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        server, port = asyncio.run_coroutine_threadsafe(_start(interceptors, credentials), loop).result(timeout=30)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
