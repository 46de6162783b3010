"""`ranker serve` with RANKER_WORKERS=2 against a real tritonserver (the supervisor's embedded one) and a real
redis-server: the workers share the port, the Triton and the catalog, and stop as one set."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import InferenceServerClient

from ranker.swap import triton_name
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.integration.conftest import ROOT, free_port, stop_process

pytestmark = [pytest.mark.triton, pytest.mark.slow]

SPADE = ranker_pb2.CatalogItem(
    item_id="live-spade", title="Brombeck forged border spade with ash handle", category="Garden", price=39.0
)
SPADE_QUERY = "brombeck forged border spade"
MODELS = ("text_encoder", "ranker")
DATABASES = iter(range(10, 16))  # redis databases 10..15, one per worker set: 0, 3, 5 and 6 belong to other tests
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
        triton = re.findall(r"embedded tritonserver (?:ready|running again) at \S+ \(pid (\d+)\)", text)
        assert triton, text[-4000:]
        return {**pids, "triton": int(triton[-1])}

    def triton_url(self) -> str:
        found = re.search(r"embedded tritonserver ready at (\S+) ", self.log.read_text(errors="replace"))
        assert found is not None
        return found[1]

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
    """Two workers on Redis databases of this test's own (each test starts with an empty catalog log)."""
    database = next(DATABASES)
    env = {
        **os.environ,
        "RANKER_WORKERS": "2",
        "RANKER_PROFILE_STORE": redis_url.replace("/0", f"/{database}"),
        "RANKER_CATALOG_STORE": redis_url.replace("/0", f"/{database}"),
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
        stop_process(process, 60)


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

            # the shared tritonserver dies: the supervisor starts it again, both workers load their models again
            os.kill(pids["triton"], signal.SIGKILL)

            def complete_everywhere() -> bool:
                replies = [s.Rank(ranker_pb2.RankRequest(query="cordless drill"), timeout=30) for s in stubs]
                return not any(r.degraded for r in replies)

            eventually(lambda: "embedded tritonserver running again" in workers.log.read_text(), "no restart", 30)
            eventually(complete_everywhere, "a worker is still degraded", 60)
            pids["triton"] = workers.pids()["triton"]
        finally:
            for channel in channels:
                channel.close()

        workers.process.send_signal(signal.SIGTERM)
        assert workers.wait_exit() == 0, workers.log.read_text()[-4000:]
        assert all(gone(pid) for pid in pids.values()), pids  # both workers and the tritonserver
        log = workers.log.read_text()
        assert log.count("stopped: in-flight RPCs finished") == 2, log[-4000:]


def release_id(release: Path) -> str:
    return str(json.loads((release / "manifest.json").read_text())["release_id"])


def test_load_release_rolls_the_whole_set_and_a_release_that_cannot_start_changes_nothing(
    example_release: Path, second_release: Path, redis_url: str, tmp_path: Path
) -> None:
    a, b = release_id(example_release), release_id(second_release)
    broken = tmp_path / "broken"
    shutil.copytree(example_release, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "release_id": "broken-release"}))
    (broken / "items.parquet").write_bytes(b"not a parquet file")

    with worker_set(example_release, redis_url, tmp_path) as workers:

        def load(path: Path) -> ranker_pb2.LoadReleaseResponse:
            with grpc.insecure_channel(workers.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                request = ranker_pb2.LoadReleaseRequest(path=str(path))
                return ranker_pb2_grpc.RankerAdminStub(channel).LoadRelease(request, timeout=300)  # type: ignore[no-any-return]

        def served_release() -> set[str]:
            """The release that each of 12 new connections is served by."""
            seen = set()
            for _ in range(12):
                with grpc.insecure_channel(workers.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                    reply = ranker_pb2_grpc.RankerStub(channel).Rank(ranker_pb2.RankRequest(query="drill"), timeout=30)
                    assert not reply.degraded, reply.degraded_reason
                    seen.add(reply.release.release_id)
            return seen

        old = workers.pids()
        with grpc.insecure_channel(workers.target) as channel:  # a catalog change, to outlive the roll
            upsert = ranker_pb2.UpsertItemsRequest(items=[SPADE])
            assert ranker_pb2_grpc.RankerStub(channel).UpsertItems(upsert, timeout=60).inserted == 1

        # two calls at once, most likely on different workers: one roll; each answers with it, or ABORTED
        with ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(load, second_release) for _ in range(2)]
            outcomes = [(c.exception() or c.result()) for c in calls]
        swaps = [o for o in outcomes if isinstance(o, ranker_pb2.LoadReleaseResponse)]
        refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        assert swaps and all(r.code() is grpc.StatusCode.ABORTED for r in refused), outcomes  # type: ignore[attr-defined]
        assert all((s.previous.release_id, s.current.release_id) == (a, b) for s in swaps)
        assert workers.log.read_text().count("rolling 2 workers") == 1
        new = workers.pids()
        assert {new["0"], new["1"]}.isdisjoint({old["0"], old["1"]}) and new["triton"] == old["triton"]
        eventually(lambda: gone(old["0"]) and gone(old["1"]), "the old set did not stop", 60)
        assert served_release() == {b}
        with grpc.insecure_channel(workers.target) as channel:  # the new set replayed the shared catalog log
            top = ranker_pb2_grpc.RankerStub(channel).Rank(ranker_pb2.RankRequest(query=SPADE_QUERY, top_k=1))
            assert top.items[0].item_id == SPADE.item_id
        triton = InferenceServerClient(workers.triton_url())
        try:  # the replaced release's models are unloaded (RANKER_RELEASE_KEEP_PREVIOUS=0), the new one's ready
            eventually(lambda: not any(triton.is_model_ready(triton_name(m, a)) for m in MODELS), "A still loaded")
            assert all(triton.is_model_ready(triton_name(m, b)) for m in MODELS)
        finally:
            triton.close()

        again = load(second_release)  # the serving release: nothing rolls
        assert again.previous.release_id == again.current.release_id == b
        assert workers.pids() == new

        with pytest.raises(grpc.RpcError) as caught:
            load(tmp_path / "nowhere")
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as caught:
            load(broken)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "did not start" in (caught.value.details() or "") and b in (caught.value.details() or "")
        assert all(not gone(new[w]) for w in ("0", "1")) and served_release() == {b}
        assert workers.process.poll() is None


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
