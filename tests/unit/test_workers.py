"""RANKER_WORKERS: the settings a set of worker processes needs, and what each worker is started with.
The processes themselves run in tests/integration/test_workers.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ranker.config import Settings, load_settings
from ranker.errors import Busy, NotConfigured, NotFound
from ranker.swap import ReleaseStamp
from ranker.workers import Supervisor, Worker, WorkerReleases
from tests.unit.fakes import tiny_release

REDIS = {"profile_store": "redis://redis:6379/0", "catalog_store": "redis://redis:6379/0"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"catalog_store": "embedded", "profile_store": REDIS["profile_store"]}, "needs catalog_store on Redis"),
        ({"catalog_store": REDIS["catalog_store"], "profile_store": "embedded"}, "needs profile_store on Redis"),
        ({**REDIS, "port": 0}, "needs a fixed port"),
        ({**REDIS, "worker_index": 2}, r"worker_index \(2\) must be below workers \(2\)"),
    ],
)
def test_workers_need_shared_stores_and_a_fixed_port(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(workers=2, **fields)  # type: ignore[arg-type]


def test_one_worker_needs_nothing_and_shared_stores_suffice() -> None:
    assert Settings().workers == 1 and Settings(port=0).port == 0  # the embedded default is untouched
    assert Settings(workers=3, **REDIS).workers == 3  # type: ignore[arg-type]
    assert Settings(workers=2, profile_store="unix:///run/redis.sock", catalog_store="rediss://r:6380/1").workers == 2
    with pytest.raises(ValidationError, match="less than or equal to 64"):
        Settings(workers=65, **REDIS)  # type: ignore[arg-type]


def test_each_worker_gets_its_index_pipe_metrics_port_and_the_shared_triton(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.setenv("RANKER_WORKER_CONTROL_FD", "99")  # a supervisor's own pipe, if it had one, is not passed on
    monkeypatch.setenv("RANKER_LOG_FORMAT", "json")
    for name, value in {**REDIS, "workers": "2", "metrics_port": "9464"}.items():
        monkeypatch.setenv(f"RANKER_{name.upper()}", value)
    settings = load_settings(release=tmp_path, port=50051)  # as `ranker serve --release R --port P` reads them
    env = Supervisor(settings).environment(1, "127.0.0.1:8001", 7)
    assert env["RANKER_WORKER_INDEX"] == "1" and env["RANKER_WORKERS"] == "2"
    assert env["RANKER_WORKER_CONTROL_FD"] == "7"
    assert env["RANKER_METRICS_PORT"] == "9465"
    assert env["RANKER_TRITON_URL"] == "127.0.0.1:8001"
    assert env["RANKER_TRITON_CONFIG_NAME"] == "cpu"  # what the embedded Triton takes, as for a single ranker
    assert (env["RANKER_RELEASE"], env["RANKER_PORT"]) == (str(tmp_path), "50051")
    assert env["RANKER_LOG_FORMAT"] == "json"  # every other setting as the supervisor got it
    worker = Settings.model_validate(
        {k[len("RANKER_") :].lower(): v for k, v in env.items() if k.startswith("RANKER_")}
    )
    assert (worker.worker_index, worker.worker_control_fd, worker.metrics_port) == (1, 7, 9465)


def test_metrics_off_stays_off_and_an_external_triton_keeps_its_config_choice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    monkeypatch.delenv("RANKER_TRITON_CONFIG_NAME", raising=False)
    settings = Settings(
        workers=2,
        release=tmp_path,
        metrics_port=0,
        triton_url="triton:8001",
        **REDIS,  # type: ignore[arg-type]
    )
    env = Supervisor(settings).environment(1, settings.triton_url, 7)
    assert env["RANKER_METRICS_PORT"] == "0"
    assert "RANKER_TRITON_CONFIG_NAME" not in env  # config.pbtxt, as a single ranker on that Triton loads


# --- a worker's LoadRelease, over fakes of its switch and its supervisor link ---------------------------------


class FakeSwitch:
    def __init__(self, release_id: str, model_loading: str = "push") -> None:
        self.serving = ReleaseStamp(release_id=release_id, model_versions={"ranker": "1"})
        self.model_loading = model_loading


class FakeLink:
    def __init__(self, reply: dict[str, Any], gate: asyncio.Event | None = None) -> None:
        self.reply = reply
        self.gate = gate
        self.sent: list[Mapping[str, Any]] = []

    async def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        self.sent.append(message)
        if self.gate is not None:
            await self.gate.wait()
        return self.reply


def release_dir(tmp_path: Path, release_id: str) -> Path:
    """A folder with what a worker reads before asking for a roll: the manifest (of tests.unit.fakes.tiny_release)."""
    path = tmp_path / release_id
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({**tiny_release().manifest.raw, "release_id": release_id}))
    return path


SWAPPED = {
    "swapped": {
        "previous": {"release_id": "rel-A", "model_versions": {"ranker": "1"}},
        "current": {"release_id": "rel-B", "model_versions": {"ranker": "2"}},
        "steps_ms": {"start": 1234.0},
    }
}


def releases(switch: FakeSwitch, link: FakeLink) -> WorkerReleases:
    return WorkerReleases(switch, link)  # type: ignore[arg-type]


def test_a_worker_asks_the_supervisor_to_roll_and_answers_with_its_result(tmp_path: Path) -> None:
    link = FakeLink(SWAPPED)
    swapped = asyncio.run(releases(FakeSwitch("rel-A"), link).load(release_dir(tmp_path, "rel-B")))
    assert link.sent == [{"load": str((tmp_path / "rel-B").resolve())}]
    assert (swapped.previous.release_id, swapped.current.release_id) == ("rel-A", "rel-B")
    assert swapped.current.model_versions == {"ranker": "2"} and swapped.steps_ms == {"start": 1234.0}


def test_what_a_worker_answers_without_the_supervisor(tmp_path: Path) -> None:
    link = FakeLink(SWAPPED)
    same = asyncio.run(releases(FakeSwitch("rel-A"), link).load(release_dir(tmp_path, "rel-A")))
    assert same.previous == same.current and same.current.release_id == "rel-A"  # serving already: no roll
    with pytest.raises(NotFound, match=r"manifest\.json is missing"):
        asyncio.run(releases(FakeSwitch("rel-A"), link).load(tmp_path / "nowhere"))
    with pytest.raises(NotConfigured, match="model-control-mode=explicit"):
        asyncio.run(releases(FakeSwitch("rel-A", "preloaded"), link).load(release_dir(tmp_path, "rel-C")))
    assert link.sent == []


@pytest.mark.parametrize(("code", "error"), [("ABORTED", Busy), ("FAILED_PRECONDITION", NotConfigured)])
def test_the_supervisors_refusal_becomes_the_rpcs_status(tmp_path: Path, code: str, error: type[Exception]) -> None:
    link = FakeLink({"error": {"code": code, "message": "release rel-B did not start"}})
    with pytest.raises(error, match="did not start"):
        asyncio.run(releases(FakeSwitch("rel-A"), link).load(release_dir(tmp_path, "rel-B")))


def test_a_second_load_in_the_same_worker_is_busy_while_the_first_rolls(tmp_path: Path) -> None:
    gate = asyncio.Event()
    link = FakeLink(SWAPPED, gate)
    loader = releases(FakeSwitch("rel-A"), link)
    target = release_dir(tmp_path, "rel-B")

    async def body() -> None:
        first = asyncio.create_task(loader.load(target))
        await asyncio.sleep(0.01)
        with pytest.raises(Busy, match="already running"):
            await loader.load(target)
        gate.set()
        assert (await first).current.release_id == "rel-B"
        await loader.load(target)  # free again

    asyncio.run(body())
    assert len(link.sent) == 2


def test_the_supervisor_reads_whole_lines_however_the_socket_cuts_them() -> None:
    ours, theirs = socket.socketpair()
    worker = Worker(index=0, process=None, link=ours)  # type: ignore[arg-type]
    try:
        theirs.sendall(b'{"serving": {"release_id": "rel-A"}}\n{"load": "/re')
        assert worker.messages() == [{"serving": {"release_id": "rel-A"}}]
        theirs.sendall(b'leases/B"}\n')
        assert worker.messages() == [{"load": "/releases/B"}]
        theirs.close()
        assert worker.messages() == [] and worker.closed
    finally:
        ours.close()


def test_a_roll_whose_caller_goes_away_runs_on_and_keeps_the_next_call_busy_until_it_ends(tmp_path: Path) -> None:
    gate = asyncio.Event()
    link = FakeLink(SWAPPED, gate)
    loader = releases(FakeSwitch("rel-A"), link)
    target = release_dir(tmp_path, "rel-B")

    async def body() -> None:
        caller = asyncio.create_task(loader.load(target))
        await asyncio.sleep(0.01)
        caller.cancel()  # the RPC's deadline, say
        with pytest.raises(asyncio.CancelledError):
            await caller
        with pytest.raises(Busy):  # the supervisor is still rolling for it
            await loader.load(target)
        gate.set()
        await asyncio.sleep(0.01)
        assert (await loader.load(target)).current.release_id == "rel-B"

    asyncio.run(body())
    assert len(link.sent) == 2  # the cancelled call still waited for its answer; the next one asked anew
