"""RankerAdmin.LoadRelease end to end: `python -m ranker serve` on a real tritonserver in explicit model-control
mode swaps releases A -> B -> A under concurrent Rank load, with no failed RPC, and unloads the replaced models."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import InferenceServerClient

from ranker.swap import triton_name
from ranker.tritonserver import LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.integration.conftest import RankerProcess

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MODELS = ("text_encoder", "ranker")
QUERIES = ["drill", "paint", "hose", "saw", "ladder", "light bulb", "faucet", "screws"]
CLIENTS = 8


@pytest.fixture(scope="module")
def explicit_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTritonServer]:
    """A tritonserver with no model and no repository: the ranker loads every model through the API."""
    server = LocalTritonServer(
        None,
        model_control_mode="explicit",
        model_config_name=None,
        log_file=tmp_path_factory.mktemp("triton-explicit") / "tritonserver.log",
    )
    server.start()
    yield server
    server.stop()


def release_id(release: Path) -> str:
    return str(json.loads((release / "manifest.json").read_text())["release_id"])


def ranker(release: Path, work_dir: Path, triton_url: str | None, **env: str) -> RankerProcess:
    """`python -m ranker serve` on a free port (with an embedded tritonserver when `triton_url` is None)."""
    return RankerProcess(release, triton_url, work_dir, {"RANKER_TRITON_TIMEOUT_S": "10", **env})


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    release_id: str
    model_versions: dict[str, str]
    degraded: str
    error: str


def rank_until(target: str, stop: threading.Event, client: int) -> list[Outcome]:
    outcomes = []
    with grpc.insecure_channel(target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        i = client
        while not stop.is_set():
            started = time.monotonic()
            try:
                request = ranker_pb2.RankRequest(query=QUERIES[i % len(QUERIES)], top_k=10)
                if client % 2:  # the profile lookup puts an await between taking the release and encoding
                    request.user_id = f"shopper-{client}"
                reply = stub.Rank(request, timeout=60)
                outcome = Outcome(
                    started,
                    time.monotonic(),
                    reply.release.release_id,
                    dict(reply.release.model_versions),
                    reply.degraded_reason if reply.degraded else "",
                    "",
                )
            except grpc.RpcError as e:
                outcome = Outcome(started, time.monotonic(), "", {}, "", f"{e.code().name}: {e.details()}")
            outcomes.append(outcome)
            i += 1
    return outcomes


def load_release(target: str, path: Path | str) -> tuple[ranker_pb2.LoadReleaseResponse, float, float]:
    with grpc.insecure_channel(target) as channel:
        started = time.monotonic()
        reply = ranker_pb2_grpc.RankerAdminStub(channel).LoadRelease(
            ranker_pb2.LoadReleaseRequest(path=str(path)), timeout=300
        )
        return reply, started, time.monotonic()


def loaded(triton: LocalTritonServer, release: str) -> dict[str, bool]:
    client = InferenceServerClient(triton.grpc_url)
    try:
        return {name: client.is_model_ready(name) for name in (triton_name(m, release) for m in MODELS)}
    finally:
        client.close()


def test_swaps_under_concurrent_rank_load_fail_no_rpc(
    example_release: Path,
    second_release: Path,
    explicit_triton: LocalTritonServer,
    tmp_path: Path,
) -> None:
    a, b = release_id(example_release), release_id(second_release)
    assert a != b
    env = {"RANKER_TRITON_MODELS": "push", "RANKER_TRITON_CONFIG_NAME": "cpu", "RANKER_STATE_DIR": str(tmp_path)}
    with ranker(example_release, tmp_path, explicit_triton.grpc_url, **env) as target:
        assert all(loaded(explicit_triton, a).values())
        stop = threading.Event()
        with ThreadPoolExecutor(CLIENTS) as pool:
            clients = [pool.submit(rank_until, target, stop, i) for i in range(CLIENTS)]
            try:
                time.sleep(1.0)
                to_b, b_sent, b_done = load_release(target, second_release)
                after_b = loaded(explicit_triton, a), loaded(explicit_triton, b)
                time.sleep(1.0)
                to_a, a_sent, a_done = load_release(target, example_release)
                after_a = loaded(explicit_triton, a), loaded(explicit_triton, b)
                time.sleep(1.0)
            finally:
                stop.set()
            outcomes = sorted((o for c in clients for o in c.result()), key=lambda o: o.started)

    # The swaps happened, and each answered what it swapped.
    assert (to_b.previous.release_id, to_b.current.release_id) == (a, b)
    assert (to_a.previous.release_id, to_a.current.release_id) == (b, a)
    assert dict(to_b.current.model_versions) == {"text_encoder": "1", "ranker": "1"} and to_b.millis > 0
    # The replaced release's models are gone from Triton; the serving one's are ready.
    assert after_b == ({n: False for n in loaded(explicit_triton, a)}, {n: True for n in loaded(explicit_triton, b)})
    assert after_a == ({n: True for n in loaded(explicit_triton, a)}, {n: False for n in loaded(explicit_triton, b)})
    # Zero failed RPCs, none degraded, every response stamped with exactly one of the two releases.
    assert [o.error for o in outcomes if o.error] == []
    assert [o.degraded for o in outcomes if o.degraded] == []
    assert {o.release_id for o in outcomes} == {a, b}
    assert all(o.model_versions == {"text_encoder": "1", "ranker": "1"} for o in outcomes)
    # Requests overlapped the swaps; after each swap every request got the new release.
    during = [o for o in outcomes if o.started < b_done and o.ended > b_sent]
    assert len(during) >= CLIENTS, len(during)
    assert {o.release_id for o in outcomes if b_done <= o.started and o.ended <= a_sent} == {b}
    assert {o.release_id for o in outcomes if o.started >= a_done} == {a}
    assert {o.release_id for o in outcomes if o.ended <= b_sent} == {a}
    print(f"{len(outcomes)} Rank calls; swap to B {to_b.millis:.0f} ms, back to A {to_a.millis:.0f} ms")


def test_load_release_errors_leave_the_release_serving(
    example_release: Path,
    second_release: Path,
    explicit_triton: LocalTritonServer,
    tmp_path: Path,
) -> None:
    a = release_id(example_release)
    env = {"RANKER_TRITON_MODELS": "push", "RANKER_TRITON_CONFIG_NAME": "cpu", "RANKER_STATE_DIR": str(tmp_path)}
    with ranker(example_release, tmp_path, explicit_triton.grpc_url, **env) as target:
        (tmp_path / "not-a-release").mkdir()
        cases = {
            "": "INVALID_ARGUMENT",
            str(tmp_path / "missing"): "NOT_FOUND",
            str(tmp_path / "not-a-release"): "NOT_FOUND",
        }
        for path, code in cases.items():
            with pytest.raises(grpc.RpcError) as caught:
                load_release(target, path)
            assert caught.value.code().name == code, (path, caught.value.details())
        # Two loads at once: the second is refused while the first runs.
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(load_release, target, second_release)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as caught:
                load_release(target, example_release)
            assert caught.value.code() is grpc.StatusCode.ABORTED, caught.value.details()
            assert first.result()[0].current.release_id == release_id(second_release)
        with grpc.insecure_channel(target) as channel:
            reply = ranker_pb2_grpc.RankerStub(channel).Rank(ranker_pb2.RankRequest(query="drill"), timeout=30)
        assert reply.release.release_id == release_id(second_release) and not reply.degraded
        assert load_release(target, example_release)[0].current.release_id == a


def test_the_embedded_tritonserver_serves_pushed_models_and_swaps(
    example_release: Path, second_release: Path, tmp_path: Path
) -> None:
    """The default: `python -m ranker serve --release R` with no Triton URL. Connections age after 1 s (grace 1 s):
    the load, longer than both, still answers on the connection it came on."""
    process = ranker(example_release, tmp_path, None, RANKER_MAX_CONNECTION_AGE_S="1", RANKER_GRACE_S="1")
    with (
        process as target,
        grpc.insecure_channel(target) as channel,
    ):
        stub = ranker_pb2_grpc.RankerStub(channel)
        reply = stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=5), timeout=30)
        assert not reply.degraded and reply.release.release_id == release_id(example_release)
        swapped, started, done = load_release(target, second_release)
        assert swapped.current.release_id == release_id(second_release)
        assert done - started > 2.5, "the load must outlast the connection's age and grace to test anything"
        reply = stub.Rank(ranker_pb2.RankRequest(query="drill", top_k=5), timeout=30)
        assert not reply.degraded and reply.release.release_id == release_id(second_release)
    assert "models push" in process.logs()
