"""RANKER_WORKERS: the settings a set of worker processes needs, and what each worker is started with.
The processes themselves run in tests/integration/test_workers.py."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from ranker.config import Settings, load_settings
from ranker.workers import Supervisor

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
    monkeypatch.setenv("RANKER_WORKER_READY_FD", "99")  # a supervisor's own pipe, if it had one, is not passed on
    monkeypatch.setenv("RANKER_LOG_FORMAT", "json")
    for name, value in {**REDIS, "workers": "2", "metrics_port": "9464"}.items():
        monkeypatch.setenv(f"RANKER_{name.upper()}", value)
    settings = load_settings(release=tmp_path, port=50051)  # as `ranker serve --release R --port P` reads them
    env = Supervisor(settings).environment(1, "127.0.0.1:8001", 7)
    assert env["RANKER_WORKER_INDEX"] == "1" and env["RANKER_WORKERS"] == "2"
    assert env["RANKER_WORKER_READY_FD"] == "7"
    assert env["RANKER_METRICS_PORT"] == "9465"
    assert env["RANKER_TRITON_URL"] == "127.0.0.1:8001"
    assert env["RANKER_TRITON_CONFIG_NAME"] == "cpu"  # what the embedded Triton takes, as for a single ranker
    assert (env["RANKER_RELEASE"], env["RANKER_PORT"]) == (str(tmp_path), "50051")
    assert env["RANKER_LOG_FORMAT"] == "json"  # every other setting as the supervisor got it
    worker = Settings.model_validate(
        {k[len("RANKER_") :].lower(): v for k, v in env.items() if k.startswith("RANKER_")}
    )
    assert (worker.worker_index, worker.worker_ready_fd, worker.metrics_port) == (1, 7, 9465)


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
