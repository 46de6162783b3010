"""Session fixtures with real parts: an exported example release, a real tritonserver, a real ranker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ranker.release import MODEL_REPOSITORY
from ranker.tritonserver import LocalTritonServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def export_release(out: Path, *extra: str) -> Path:
    """Run the real export CLI, as a user would."""
    command = [
        sys.executable,
        "-m",
        "offline.export",
        "--catalog",
        str(EXAMPLES / "catalog.csv"),
        "--judgments",
        str(EXAMPLES / "judgments.csv"),
        "--out",
        str(out),
        "--no-finetune",  # fast; fine-tuning has its own test in test_export.py
        *extra,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise AssertionError(f"export failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return out


def prebuilt_or_exported(variable: str, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """The release the environment variable names, else the example catalog exported into a new folder."""
    prebuilt = os.environ.get(variable)
    if prebuilt:
        return Path(prebuilt)
    return export_release(tmp_path_factory.mktemp(f"release-{name}") / name)


@pytest.fixture(scope="session")
def example_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example catalog exported once per session (RANKER_TEST_RELEASE reuses a prebuilt one)."""
    return prebuilt_or_exported("RANKER_TEST_RELEASE", tmp_path_factory, "example")


@pytest.fixture(scope="session")
def second_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another export of the example catalog: another release id (RANKER_TEST_RELEASE_B reuses a prebuilt one)."""
    return prebuilt_or_exported("RANKER_TEST_RELEASE_B", tmp_path_factory, "example-b")


@pytest.fixture(scope="session")
def triton(example_release: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTritonServer]:
    # Fixed ports, so a test can stop and restart it under the ranker's feet.
    server = LocalTritonServer(
        example_release / MODEL_REPOSITORY,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path_factory.mktemp("triton") / "tritonserver.log",
    )
    server.start()
    yield server
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and SIGKILL when it has not exited after `timeout` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's name (state, ppid, pgrp, ...); None once it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """The pids of the running processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def still_running(pids: list[int], timeout: float) -> list[int]:
    """Wait up to `timeout` seconds for every one of `pids` to exit; those that have not (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if (fields := _stat_fields(pid)) is not None and fields[0] != "Z"]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def wait_serving(
    target: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 120.0,
    channel: Callable[[str], grpc.Channel] = grpc.insecure_channel,
) -> None:
    """Until the ranker at `target` answers health SERVING (over `channel`, e.g. a TLS one); fails with its
    log when it exits or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"ranker exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        with channel(target) as channel_:
            try:
                reply = health_pb2_grpc.HealthStub(channel_).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.3)
    raise AssertionError(f"ranker not serving after {timeout}s:\n{log.read_text()[-4000:]}")


class RankerProcess:
    """`python -m ranker serve` on a free port, restartable on the same port with the same settings.

    Each start logs to its own file in `work_dir`. Defaults: metrics off (port 9464 would clash
    between concurrent test sessions), a private state directory (catalog journal, embedded
    profiles), a 5 s Triton timeout; `env` (RANKER_* settings) wins over them. With `triton_url`
    None the ranker starts its own embedded tritonserver.
    """

    def __init__(
        self,
        release: Path,
        triton_url: str | None,
        work_dir: Path,
        env: dict[str, str] | None = None,
        *,
        state_dir: Path | None = None,
    ) -> None:
        self.release = release
        self.triton_url = triton_url
        self.work_dir = work_dir
        self.state_dir = state_dir or work_dir / "state"
        self.env = env or {}
        self.port = free_port()
        self.starts = 0
        self.log = work_dir / "ranker-0.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RankerProcess:
        self.starts += 1
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log = self.work_dir / f"ranker-{self.starts}.log"
        command = [
            sys.executable, "-m", "ranker", "serve", "--release", str(self.release),
            "--port", str(self.port), "--host", "127.0.0.1",
        ]  # fmt: skip
        if self.triton_url is not None:
            command += ["--triton-url", self.triton_url]
        env = {
            **os.environ,
            "RANKER_TRITON_TIMEOUT_S": "5",
            "RANKER_METRICS_PORT": "0",
            "RANKER_STATE_DIR": str(self.state_dir),
            **self.env,
        }
        with self.log.open("wb") as sink:
            self._process = subprocess.Popen(
                command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        wait_serving(self.target, self._process, self.log)
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, 30)

    def __enter__(self) -> str:
        return self.start().target

    def __exit__(self, *_: object) -> None:
        self.stop()

    def logs(self) -> str:
        """Everything every start of this ranker has logged."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.work_dir.glob("ranker-*.log")))

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no ranker log)"


def health_status(channel: grpc.Channel, service: str = "") -> int:
    """The grpc.health.v1 status of `service` on the server behind a blocking channel."""
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(reply.status)


SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="session")
def ranker_target(
    example_release: Path, triton: LocalTritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`python -m ranker serve` on a free port, talking to the session's tritonserver."""
    with RankerProcess(example_release, triton.grpc_url, tmp_path_factory.mktemp("ranker")) as target:
        yield target
