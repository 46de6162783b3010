"""A ranker stopped under load loses no call: two real rankers behind a client that balances over both with
client-side health checking; one is stopped with SIGTERM mid-run, and every Rank must still succeed.

Without a drain, gRPC's stop cancels each call that has arrived but not yet reached a handler, and clients keep
sending until they hear of the stop (CANCELLED, seen 5-14 ms before SIGTERM with 8 busy clients). With
RANKER_DRAIN_S the server reports NOT_SERVING and keeps serving while the client moves its calls to the other
ranker. Both rankers also age their connections (RANKER_MAX_CONNECTION_AGE_S) many times during the run: a
GOAWAY for age must not fail a call either.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from ranker.server import SERVICE_NAME
from ranker.tritonserver import LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.integration.conftest import RankerProcess

pytestmark = [pytest.mark.triton, pytest.mark.slow]

CLIENTS = 8
QUERIES = ["drill", "paint", "hose", "saw", "mower", "light bulb", "faucet", "screws", "hammer", "sander"]
BEFORE_STOP_S = 2.0  # load on both rankers before SIGTERM
AFTER_STOP_S = 1.5  # load on the survivor after the stopped ranker has exited
DRAIN_S = 1.5
CONNECTION_AGE_S = 0.7
# Round robin over both addresses; a subchannel whose server reports NOT_SERVING for the Ranker service is
# taken out of the rotation (grpc.health.v1 Watch).
SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": SERVICE_NAME}}
)


async def load(target: str, stop: asyncio.Event) -> tuple[Counter[str], list[float]]:
    """CLIENTS closed loops of Rank over one balanced channel until `stop`: status counts, success times."""
    codes: Counter[str] = Counter()
    successes: list[float] = []
    async with grpc.aio.insecure_channel(target, options=[("grpc.service_config", SERVICE_CONFIG)]) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)

        async def client(n: int) -> None:
            i = n
            while not stop.is_set():
                request = ranker_pb2.RankRequest(query=QUERIES[i % len(QUERIES)], top_k=10)
                i += 1
                try:
                    await stub.Rank(request, timeout=10)
                except grpc.aio.AioRpcError as e:
                    codes[f"{e.code().name}: {e.details()}"] += 1
                else:
                    codes["OK"] += 1
                    successes.append(time.monotonic())

        await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    return codes, successes


def test_sigterm_under_load_fails_no_call(example_release: Path, triton: LocalTritonServer, tmp_path: Path) -> None:
    env = {"RANKER_DRAIN_S": str(DRAIN_S), "RANKER_MAX_CONNECTION_AGE_S": str(CONNECTION_AGE_S)}
    leaving = RankerProcess(example_release, triton.grpc_url, tmp_path / "a", env).start()
    staying = RankerProcess(example_release, triton.grpc_url, tmp_path / "b", env).start()
    try:

        async def run() -> tuple[Counter[str], list[float], float, float]:
            stop = asyncio.Event()
            task = asyncio.create_task(load(f"ipv4:{leaving.target},{staying.target}", stop))
            await asyncio.sleep(BEFORE_STOP_S)
            process = leaving._process
            assert process is not None
            signalled = time.monotonic()
            process.terminate()
            while process.poll() is None:
                assert time.monotonic() - signalled < 30, "the ranker did not exit within 30 s of SIGTERM"
                await asyncio.sleep(0.05)
            exited = time.monotonic()
            await asyncio.sleep(AFTER_STOP_S)
            stop.set()
            codes, successes = await task
            return codes, successes, signalled, exited

        codes, successes, signalled, exited = asyncio.run(run())
        log = leaving.logs()
        served_by_leaving = log.count("rpc finished")
        assert leaving._process is not None and leaving._process.returncode == 0, log[-3000:]
    finally:
        leaving.stop()
        staying.stop()

    errors = {code: n for code, n in codes.items() if code != "OK"}
    assert not errors, f"calls failed while one ranker stopped: {errors} (of {sum(codes.values())})"
    assert served_by_leaving > 20, f"the stopped ranker took only {served_by_leaving} calls: the test proved nothing"
    assert "draining" in log, log[-3000:]
    assert exited - signalled >= DRAIN_S, f"exited {exited - signalled:.2f}s after SIGTERM, before the drain ended"
    # the survivor kept answering through the stop and after it
    assert sum(signalled < t < exited for t in successes) > 20
    assert sum(t > exited for t in successes) > 20
