"""The stop sequence: NOT_SERVING first, serving on through the drain (cut short by a second signal), then the
gRPC stop; connection aging in the server's options. tests/integration/test_graceful_stop.py runs it for real."""

from __future__ import annotations

import asyncio
import time

import pytest
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from ranker.config import Settings
from ranker.server import RunningServer, server_options


class RecordingServer:
    def __init__(self) -> None:
        self.stopped_at: float | None = None
        self.grace: float | None = None

    async def stop(self, grace: float) -> None:
        self.stopped_at, self.grace = time.monotonic(), grace


async def health_of(health: health_aio.HealthServicer) -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), None)
    return int(reply.status)


def stopping(drain: float, cut_after: float | None) -> tuple[float, float | None, int]:
    """Seconds from the stop call to the gRPC stop, its grace, and health status seen just after the call."""

    async def run() -> tuple[float, float | None, int]:
        health = health_aio.HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        grpc_server = RecordingServer()
        running = RunningServer(server=grpc_server, port=0, health=health)  # type: ignore[arg-type]
        cut = asyncio.Event()
        if cut_after is not None:
            asyncio.get_running_loop().call_later(cut_after, cut.set)
        began = time.monotonic()
        task = asyncio.create_task(running.stop(3.0, drain=drain, cut_short=cut))
        await asyncio.sleep(0.01)
        status = await health_of(health)
        await task
        assert grpc_server.stopped_at is not None
        return grpc_server.stopped_at - began, grpc_server.grace, status

    return asyncio.run(run())


def test_health_turns_not_serving_and_the_server_stops_after_the_drain() -> None:
    waited, grace, status = stopping(drain=0.3, cut_after=None)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert 0.3 <= waited < 1.0
    assert grace == 3.0


def test_a_second_signal_cuts_the_drain_short() -> None:
    waited, _, _ = stopping(drain=30.0, cut_after=0.1)
    assert 0.1 <= waited < 1.0


def test_no_drain_stops_at_once() -> None:
    waited, _, status = stopping(drain=0.0, cut_after=None)
    assert waited < 0.5
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_connection_aging_is_off_unless_set() -> None:
    assert not [name for name, _ in server_options(Settings()) if "connection_age" in name]
    options = dict(server_options(Settings(max_connection_age_s=10, grace_s=4)))
    assert options["grpc.max_connection_age_ms"] == 10_000
    assert options["grpc.max_connection_age_grace_ms"] == 900_000  # room for a release load on an aged connection


@pytest.mark.parametrize(("name", "value"), [("drain_s", -1), ("drain_s", 601), ("max_connection_age_s", 0)])
def test_bad_stop_settings_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        Settings(**{name: value})
