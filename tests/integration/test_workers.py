"""`ranker serve` with RANKER_WORKERS=2 against a real tritonserver (the supervisor's embedded one) and a real
redis-server: the workers share the port, the Triton and the catalog, and stop as one set."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.integration.conftest import ROOT, free_port

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SPADE = ranker_pb2.CatalogItem(
    item_id="live-spade", title="Brombeck forged border spade with ash handle", category="Garden", price=39.0
)
SPADE_QUERY = "brombeck forged border spade"
RANK_OK = 'ranker_rpcs_total{code="OK",method="/ranker.v1.Ranker/Rank"}'


@dataclass
class WorkerSet:
    process: subprocess.Popen[bytes]
    target: str
    metrics_ports: tuple[int, int]
    log: Path

    def pids(self) -> dict[str, int]:
        """Worker index (or 'triton') -> pid, from the supervisor's log."""
        text = self.log.read_text(errors="replace")
        pids = {m[1]: int(m[2]) for m in re.finditer(r"worker (\d+) started \(pid (\d+)\)", text)}
        triton = re.search(r"embedded tritonserver ready at \S+ \(pid (\d+)\)", text)
        assert triton is not None, text[-4000:]
        return {**pids, "triton": int(triton[1])}

    def rank_calls(self, worker: int) -> float:
        """Rank calls answered OK by one worker, from its own /metrics."""
        url = f"http://127.0.0.1:{self.metrics_ports[worker]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            lines = reply.read().decode().splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(RANK_OK))

    def wait_exit(self, timeout: float = 90.0) -> int:
        return self.process.wait(timeout=timeout)


def free_port_pair() -> int:
    """A port whose next port is free too (worker 0's and worker 1's metrics)."""
    for _ in range(50):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 1))
            return port
    raise AssertionError("no two free consecutive ports")


def worker_env(redis_url: str, tmp_path: Path, metrics: int) -> dict[str, str]:
    env = {
        **os.environ,
        "RANKER_WORKERS": "2",
        "RANKER_PROFILE_STORE": redis_url.replace("/0", "/5"),
        "RANKER_CATALOG_STORE": redis_url.replace("/0", "/6"),
        "RANKER_METRICS_PORT": str(metrics),
        "RANKER_STATE_DIR": str(tmp_path / "state"),
        "RANKER_TRITON_TIMEOUT_S": "5",
    }
    env.pop("RANKER_TRITON_URL", None)  # the supervisor starts the embedded tritonserver
    return env


@contextlib.contextmanager
def worker_set(release: Path, redis_url: str, tmp_path: Path) -> Iterator[WorkerSet]:
    port, metrics = free_port(), free_port_pair()
    log = tmp_path / "supervisor.log"
    env = worker_env(redis_url, tmp_path, metrics)
    command = [sys.executable, "-m", "ranker", "serve", "--release", str(release), "--port", str(port)]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1"], cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 240
        while "2 workers serving" not in log.read_text(errors="replace"):
            assert process.poll() is None, f"exited with {process.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not serving in time:\n{log.read_text()[-4000:]}"
            time.sleep(0.3)
        yield WorkerSet(process, f"127.0.0.1:{port}", (metrics, metrics + 1), log)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_workers_share_the_port_the_triton_and_the_catalog_and_stop_together(
    example_release: Path, redis_url: str, tmp_path: Path
) -> None:
    with worker_set(example_release, redis_url, tmp_path) as workers:
        pids = workers.pids()
        # 24 connections of their own: the kernel spreads connections over the workers (all on one: p = 2^-23)
        channels = [
            grpc.insecure_channel(workers.target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(24)
        ]
        stubs = [ranker_pb2_grpc.RankerStub(c) for c in channels]
        try:
            for stub in stubs:
                response = stub.Rank(ranker_pb2.RankRequest(query="cordless drill", top_k=5), timeout=30)
                assert not response.degraded, response.degraded_reason
                assert len(response.items) == 5
            calls = [workers.rank_calls(0), workers.rank_calls(1)]
            assert sum(calls) == 24 and min(calls) > 0, calls

            # a catalog change taken by one worker is served by every connection, so by both workers
            reply = stubs[0].UpsertItems(ranker_pb2.UpsertItemsRequest(items=[SPADE]), timeout=60)
            assert reply.inserted == 1

            def everywhere() -> bool:
                tops = [s.Rank(ranker_pb2.RankRequest(query=SPADE_QUERY, top_k=1), timeout=30) for s in stubs]
                return all(t.items and t.items[0].item_id == SPADE.item_id for t in tops)

            eventually(everywhere, "a worker does not serve the other's upsert")

            # a release load would swap one worker only
            admin = ranker_pb2_grpc.RankerAdminStub(channels[0])
            with pytest.raises(grpc.RpcError) as caught:
                admin.LoadRelease(ranker_pb2.LoadReleaseRequest(path=str(example_release)), timeout=30)
            assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "RANKER_WORKERS" in (caught.value.details() or "")
        finally:
            for channel in channels:
                channel.close()

        workers.process.send_signal(signal.SIGTERM)
        assert workers.wait_exit() == 0, workers.log.read_text()[-4000:]
        assert all(gone(pid) for pid in pids.values()), pids  # both workers and the tritonserver
        log = workers.log.read_text()
        assert log.count("stopped: in-flight RPCs finished") == 2, log[-4000:]


def test_a_killed_worker_is_started_again_and_a_crash_loop_stops_the_set(
    example_release: Path, redis_url: str, tmp_path: Path
) -> None:
    with worker_set(example_release, redis_url, tmp_path) as workers:
        first = workers.pids()
        os.kill(first["1"], signal.SIGKILL)
        eventually(lambda: workers.log.read_text().count("worker 1 started") == 2, "worker 1 not restarted", 30)
        eventually(lambda: workers.log.read_text().count("worker 1 (pid") >= 3, "worker 1 not serving again", 60)
        assert workers.process.poll() is None and not gone(first["0"])  # worker 0 served on
        with grpc.insecure_channel(workers.target) as channel:
            response = ranker_pb2_grpc.RankerStub(channel).Rank(ranker_pb2.RankRequest(query="drill"), timeout=30)
            assert not response.degraded

        # three more exits within the window: a crash loop, and the whole set stops for the orchestrator
        for round_ in range(3):
            pid = workers.pids()["1"]
            os.kill(pid, signal.SIGKILL)
            if round_ < 2:  # the next one must be serving before it is killed (one that dies starting ends the set)

                def serving(pid: int = pid) -> bool:
                    new = workers.pids()["1"]
                    return new != pid and f"worker 1 (pid {new}) serving" in workers.log.read_text()

                eventually(serving, "worker 1 not restarted", 60)
        assert workers.wait_exit() == 1, workers.log.read_text()[-4000:]
        log = workers.log.read_text()
        assert "4 worker exits within 60 s: stopping the set" in log, log[-4000:]
        assert all(gone(pid) for pid in [*first.values(), *workers.pids().values()])


def test_a_worker_that_cannot_start_stops_the_supervisor_and_its_triton(redis_url: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "ranker", "serve", "--release", str(tmp_path / "missing")]
    env = {**worker_env(redis_url, tmp_path, 0), "RANKER_PORT": str(free_port())}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-4000:]
    assert "worker 0 (pid" in done.stderr and "before it served" in done.stderr, done.stderr[-4000:]
    assert "worker 1 started" not in done.stderr
    triton = re.search(r"embedded tritonserver ready at \S+ \(pid (\d+)\)", done.stderr)
    assert triton is not None and gone(int(triton[1]))
