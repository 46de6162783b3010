"""A private `python -m ranker serve` subprocess for tests that must not disturb the session's ranker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import ROOT, free_port, wait_serving


class RankerProcess:
    """One ranker on a free port with its own state directory; `env` (RANKER_* settings) wins over the
    defaults here (metrics off, so concurrent sessions do not clash on port 9464)."""

    def __init__(self, release: Path, triton_url: str, work_dir: Path, env: dict[str, str] | None = None) -> None:
        self.release = release
        self.triton_url = triton_url
        self.state_dir = work_dir / "state"
        self.log = work_dir / "ranker.log"
        self.env = env or {}
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RankerProcess:
        command = [
            sys.executable, "-m", "ranker", "serve", "--release", str(self.release),
            "--port", str(self.port), "--host", "127.0.0.1", "--triton-url", self.triton_url,
        ]  # fmt: skip
        env = {
            **os.environ,
            "RANKER_METRICS_PORT": "0",
            "RANKER_STATE_DIR": str(self.state_dir),
            "RANKER_LOG_LEVEL": "WARNING",  # no access log line per fuzzed request
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
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

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
