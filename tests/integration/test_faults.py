"""Triton hangs, then dies, under load, and comes back: Rank never fails, degrades fast (the circuit breaker),
recovers by itself; no acknowledged event is lost.

Its own tritonserver (fixed ports, so it can be restarted where the ranker expects it) and its own
`python -m ranker serve`, so the session's servers are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from ranker.profiles import EmbeddedProfileStore
from ranker.release import MODEL_REPOSITORY
from ranker.tritonserver import LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.integration.conftest import RankerProcess, children, free_port, still_running

pytestmark = [pytest.mark.triton, pytest.mark.slow]

CLIENTS = 8
TOP_K = 10
DEADLINE_S = 10.0  # per Rank; generous: no response may be an error, a missed deadline included
TRITON_TIMEOUT_S = 1.0  # RANKER_TRITON_TIMEOUT_S of the ranker under test
STEADY_S = 3.0  # load before the faults
HANG_S = 4.0  # Triton stopped (SIGSTOP): calls hang until TRITON_TIMEOUT_S, until the breaker opens
OUTAGE_S = 3.0  # then killed (SIGKILL): load on a dead Triton before restarting it
AFTER_RECOVERY_S = 3.0  # load after the first complete response again
RECOVERY_LIMIT_S = 15.0  # from Triton ready again to the first complete (non-degraded) response
FAIL_FAST_P99_S = 0.5  # degraded responses while Triton is dead must not wait for anything
# While Triton hangs, only the calls that find the breaker closed (the first few, then one probe per
# cool-down) wait for their deadline (TRITON_TIMEOUT_S bounds a Rank's model calls); without the
# breaker every call would.
MAX_TIMEOUT_SHARE_WHILE_HUNG = 0.1
# Each has at least TOP_K lexical matches: with the encoder down, BM25 alone must still fill the page.
QUERIES = ["drill", "paint", "hose", "saw", "mower", "light bulb", "faucet", "screws", "hammer", "sander"]
USER = "fault-test-shopper"


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic()
    seconds: float
    code: grpc.StatusCode
    details: str = ""
    degraded: bool = False
    reason: str = ""
    items: int = 0
    query: str = ""


@dataclass
class Events:
    """RecordEvents sent during the run: every acknowledged (applied) event id, and the failures."""

    acknowledged: list[str] = field(default_factory=list)
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    unimplemented: str | None = None


@pytest.fixture
def own_triton(example_release: Path, tmp_path: Path) -> Iterator[LocalTritonServer]:
    """This test's own tritonserver, on ports fixed before the first start so a restart reuses them."""
    server = LocalTritonServer(
        example_release / MODEL_REPOSITORY,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path / "tritonserver.log",
    )
    server.start()
    yield server
    if server.pid is not None:  # a failure while it was stopped (SIGSTOP) must not hang the teardown
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
def ranker(example_release: Path, own_triton: LocalTritonServer, tmp_path: Path) -> Iterator[RankerProcess]:
    process = RankerProcess(
        example_release,
        own_triton.grpc_url,
        tmp_path,
        env={"RANKER_TRITON_TIMEOUT_S": str(TRITON_TIMEOUT_S), "RANKER_PROFILE_STORE": "embedded"},
    )
    process.start()
    yield process
    process.stop()


async def _rank_client(stub: ranker_pb2_grpc.RankerStub, client: int, stop: asyncio.Event, out: list[Outcome]) -> None:
    for n in itertools.count():
        if stop.is_set():
            return
        request = ranker_pb2.RankRequest(query=QUERIES[(client + n) % len(QUERIES)], top_k=TOP_K)
        if client % 2:  # half the traffic reads the profile RecordEvents is writing
            request.user_id = USER
        started = time.monotonic()
        try:
            response = await stub.Rank(request, timeout=DEADLINE_S)
        except grpc.aio.AioRpcError as e:
            out.append(Outcome(started, time.monotonic() - started, e.code(), e.details() or ""))
            await asyncio.sleep(0.05)  # a failing server must not turn this loop into a busy spin
            continue
        out.append(
            Outcome(
                started,
                time.monotonic() - started,
                grpc.StatusCode.OK,
                degraded=response.degraded,
                reason=response.degraded_reason,
                items=len(response.items),
                query=request.query,
            )
        )


async def _event_client(
    stub: ranker_pb2_grpc.RankerStub, item_ids: list[str], stop: asyncio.Event, events: Events
) -> None:
    """A few events every 100 ms for one user; every fifth batch is a retry of the previous one."""
    previous: ranker_pb2.RecordEventsRequest | None = None
    for n in itertools.count():
        if stop.is_set():
            return
        if previous is not None and n % 5 == 0:
            request = previous  # a client retrying: acknowledged, never applied twice
        else:
            request = ranker_pb2.RecordEventsRequest(
                events=[
                    ranker_pb2.Event(
                        event_id=f"fault-{n}-{i}",
                        user_id=USER,
                        item_id=item_ids[(n * 3 + i) % len(item_ids)],
                        type=(ranker_pb2.EVENT_TYPE_VIEW, ranker_pb2.EVENT_TYPE_CLICK)[i % 2],
                    )
                    for i in range(1 + n % 3)
                ]
            )
        try:
            reply = await stub.RecordEvents(request, timeout=DEADLINE_S)
        except grpc.aio.AioRpcError as e:
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                events.unimplemented = e.details() or "UNIMPLEMENTED"
                return
            events.errors.append(f"{e.code().name}: {e.details()}")
        else:
            assert not reply.rejected, list(reply.rejected)
            if request is previous:
                events.duplicates += reply.duplicates
                assert reply.applied == 0, "a retried batch was applied twice"
            else:
                assert reply.applied == len(request.events), reply
                events.acknowledged += [e.event_id for e in request.events]
            previous = request
        await asyncio.sleep(0.1)


def _hang(server: LocalTritonServer) -> None:
    """SIGSTOP: connections stay open and requests are accepted by the kernel, but nothing answers."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)


def _kill(server: LocalTritonServer) -> None:
    """SIGKILL: no drain, connections reset mid-request. stop() then reaps the process and stops the python
    backend stubs it leaves: after the hang, the encoder's stub used to stay for good, blocked in its exit."""
    assert server.pid is not None
    stubs = children(server.pid)
    assert stubs, "no python backend stub under tritonserver"
    os.kill(server.pid, signal.SIGKILL)
    server.stop()
    assert still_running(stubs, timeout=5.0) == []


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Timeline:
    hung: float = 0.0
    killed: float = 0.0
    restart_begun: float = 0.0
    ready_again: float = 0.0
    recovered: float = 0.0
    ended: float = 0.0


async def _run(ranker: RankerProcess, triton: LocalTritonServer) -> tuple[list[Outcome], Events, Timeline]:
    outcomes: list[Outcome] = []
    events = Events()
    timeline = Timeline()
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(ranker.target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        sample = await stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=20), timeout=DEADLINE_S)
        item_ids = [item.item_id for item in sample.items]
        tasks = [asyncio.create_task(_rank_client(stub, c, stop, outcomes)) for c in range(CLIENTS)]
        tasks.append(asyncio.create_task(_event_client(stub, item_ids, stop, events)))
        try:
            await asyncio.sleep(STEADY_S)
            timeline.hung = time.monotonic()
            _hang(triton)
            await asyncio.sleep(HANG_S)
            timeline.killed = time.monotonic()
            await asyncio.to_thread(_kill, triton)
            await asyncio.sleep(OUTAGE_S)
            timeline.restart_begun = time.monotonic()
            await asyncio.to_thread(triton.start)  # same ports; blocks until its models are ready
            timeline.ready_again = time.monotonic()
            while time.monotonic() - timeline.ready_again < RECOVERY_LIMIT_S + 5:
                done = [o for o in outcomes if o.started >= timeline.ready_again and o.code is grpc.StatusCode.OK]
                if any(not o.degraded for o in done):
                    timeline.recovered = min(o.started + o.seconds for o in done if not o.degraded)
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(AFTER_RECOVERY_S)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            timeline.ended = time.monotonic()
    return outcomes, events, timeline


def _ms(values: list[float]) -> str:
    if not values:
        return "n=0"
    return (
        f"n={len(values)}, p50 {_percentile(values, 0.5) * 1000:.1f} ms, p99 {_percentile(values, 0.99) * 1000:.1f} ms"
    )


def test_rank_survives_triton_hung_then_killed_under_load(ranker: RankerProcess, own_triton: LocalTritonServer) -> None:
    outcomes, events, timeline = asyncio.run(_run(ranker, own_triton))
    assert ranker.alive, ranker.log_tail()

    # Not one RPC failed: every answer is complete, or degraded with a reason.
    failures = [o for o in outcomes if o.code is not grpc.StatusCode.OK]
    assert not failures, [(o.code.name, o.details) for o in failures[:10]]
    assert all(o.items == TOP_K for o in outcomes), [
        (round(o.started - timeline.hung, 2), o.query, o.reason) for o in outcomes if o.items != TOP_K
    ][:20]
    assert all(bool(o.reason) == o.degraded for o in outcomes)

    def started(start: float, end: float) -> list[Outcome]:
        return [o for o in outcomes if start <= o.started < end]

    before = [o for o in outcomes if o.started + o.seconds < timeline.hung]
    hung = started(timeline.hung + 0.1, timeline.killed)
    # Sent once the kill had taken effect, answered before the restarted Triton was even ready.
    dead = [
        o
        for o in started(timeline.killed + 0.2, timeline.restart_begun)
        if o.started + o.seconds < timeline.ready_again
    ]
    restarting = started(timeline.restart_begun, timeline.ready_again)
    assert before and not any(o.degraded for o in before), {o.reason for o in before if o.degraded}
    assert len(hung) >= CLIENTS and len(dead) >= CLIENTS, (len(hung), len(dead))
    assert all(o.degraded for o in hung + dead + restarting)
    assert all("unavailable" in o.reason for o in dead), {o.reason for o in dead}

    waited = [o for o in hung if "Timeout" in o.reason]  # e.g. "text_encoder unavailable (BackendTimeout): ..."
    degraded_dead = [o.seconds for o in dead + restarting]
    recovery_s = timeline.recovered - timeline.ready_again if timeline.recovered else float("inf")
    after = [o for o in outcomes if o.started >= timeline.recovered] if timeline.recovered else []
    print(
        f"\n[faults] {len(outcomes)} Rank calls ({CLIENTS} clients), 0 errors."
        f" Healthy: {_ms([o.seconds for o in before])}."
        f" Triton hung (SIGSTOP {HANG_S:g} s), all degraded: {_ms([o.seconds for o in hung])},"
        f" {len(waited)} waited for the deadline (slowest {max(o.seconds for o in hung) * 1000:.0f} ms);"
        f" reasons {dict(Counter(o.reason for o in hung))}."
        f" Triton dead (SIGKILL, then restarting), all degraded: {_ms(degraded_dead)}."
        f" Restart took {timeline.ready_again - timeline.restart_begun:.1f} s; first complete response"
        f" {recovery_s:.2f} s after Triton was ready again ({timeline.recovered - timeline.restart_begun:.2f} s after"
        f" the restart began); after recovery {len(after)} calls, {sum(o.degraded for o in after)} degraded."
        f" RecordEvents: {len(events.acknowledged)} events acknowledged, {events.duplicates} retried duplicates."
    )
    assert len(waited) <= MAX_TIMEOUT_SHARE_WHILE_HUNG * len(hung), "the breaker should stop the waiting"
    p99 = _percentile(degraded_dead, 0.99)
    assert p99 < FAIL_FAST_P99_S, f"degraded p99 {p99:.3f} s while Triton is down"
    assert recovery_s < RECOVERY_LIMIT_S, f"no complete response {RECOVERY_LIMIT_S} s after Triton came back"
    # Once back, it stays back: the last second of load is complete.
    tail = [o for o in after if o.started + o.seconds >= timeline.ended - 1.0]
    assert tail and not any(o.degraded for o in tail), {o.reason for o in tail if o.degraded}

    # No acknowledged event was lost, none applied twice.
    if events.unimplemented is not None:
        pytest.skip(f"RecordEvents is UNIMPLEMENTED ({events.unimplemented}): event durability not checked")
    assert not events.errors, events.errors[:5]
    assert len(events.acknowledged) > 20 and events.duplicates > 0
    asyncio.run(_check_events(ranker, events))


async def _check_events(ranker: RankerProcess, events: Events) -> None:
    async with grpc.aio.insecure_channel(ranker.target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        response = await stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=5, user_id=USER), timeout=DEADLINE_S)
        assert response.personalization == ranker_pb2.PERSONALIZATION_APPLIED
        # Replaying every acknowledged event: all are known (stored), none is applied again.
        item_id = response.items[0].item_id
        applied = duplicates = 0
        for start in range(0, len(events.acknowledged), 1000):  # the per-request limit
            replay = ranker_pb2.RecordEventsRequest(
                events=[
                    ranker_pb2.Event(event_id=e, user_id=USER, item_id=item_id, type=ranker_pb2.EVENT_TYPE_VIEW)
                    for e in events.acknowledged[start : start + 1000]
                ]
            )
            reply = await stub.RecordEvents(replay, timeout=DEADLINE_S)
            applied, duplicates = applied + reply.applied, duplicates + reply.duplicates
        assert (applied, duplicates) == (0, len(events.acknowledged))
    ranker.stop()  # the embedded store is one process's file: read it once the ranker is gone
    store = EmbeddedProfileStore(ranker.state_dir / "profiles" / "profiles.sqlite3", ttl_s=86400.0, dedup_ttl_s=86400.0)
    try:
        profile = await store.get(USER)
    finally:
        await store.close()
    assert profile is not None and profile.events == len(events.acknowledged), (
        profile and profile.events,
        len(events.acknowledged),
    )


def test_the_embedded_tritonserver_is_started_again_when_it_dies(example_release: Path, tmp_path: Path) -> None:
    """The default set-up (`ranker serve` with its own tritonserver): killed, it comes back on the same port, the
    ranker loads its models into it again, and Rank is complete again without anyone restarting anything."""
    with RankerProcess(example_release, None, tmp_path) as target, grpc.insecure_channel(target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)

        def rank() -> ranker_pb2.RankResponse:
            return stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=TOP_K), timeout=DEADLINE_S)

        assert not rank().degraded
        first = re.search(r"embedded tritonserver ready at (\S+) \(pid (\d+)\)", _logs(tmp_path))
        assert first is not None
        os.kill(int(first[2]), signal.SIGKILL)
        degraded, deadline = 0, time.monotonic() + 60
        while True:  # every call answers meanwhile: degraded, then complete again
            response = rank()
            assert len(response.items) == TOP_K
            if not response.degraded and degraded:
                break
            degraded += response.degraded
            assert time.monotonic() < deadline, f"not complete again after 60 s:\n{_logs(tmp_path)[-4000:]}"
            time.sleep(0.1)
        again = re.search(r"embedded tritonserver running again at (\S+) \(pid (\d+)\)", _logs(tmp_path))
        assert again is not None and again[1] == first[1] and again[2] != first[2]


def _logs(work_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(work_dir.glob("ranker-*.log")))
