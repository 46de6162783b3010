"""Session fixtures with real parts: an exported example release, a real tritonserver, a real ranker."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def example_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example catalog exported once per session (RANKER_TEST_RELEASE reuses a prebuilt one)."""
    prebuilt = os.environ.get("RANKER_TEST_RELEASE")
    if prebuilt:
        return Path(prebuilt)
    return export_release(tmp_path_factory.mktemp("release") / "example")


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


def wait_serving(target: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"ranker exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        with grpc.insecure_channel(target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.3)
    raise AssertionError(f"ranker not serving after {timeout}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def ranker_target(
    example_release: Path, triton: LocalTritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`python -m ranker serve` on a free port, talking to the session's tritonserver."""
    port = free_port()
    log = tmp_path_factory.mktemp("ranker") / "ranker.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ranker",
                "serve",
                "--release",
                str(example_release),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--triton-url",
                triton.grpc_url,
            ],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            # Metrics off: the default port 9464 would clash between concurrent test sessions.
            # Its own state directory: catalog updates journaled elsewhere must not leak into these tests.
            env={
                **os.environ,
                "RANKER_TRITON_TIMEOUT_S": "5",
                "RANKER_METRICS_PORT": "0",
                "RANKER_STATE_DIR": str(tmp_path_factory.mktemp("state")),
            },
        )
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process, log)
        yield target
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
