"""A real redis-server for tests: started on a free port in a temporary folder, without persistence; with
`tls` it listens for TLS only (its certificate, key and the CA that signs clients' certificates)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "install it with scripts/install-redis.sh (`make install` runs it)"


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).is_file()), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RedisTls:
    cert: Path
    key: Path
    ca: Path  # verifies client certificates, and the server's own for the readiness check
    auth_clients: bool = False  # require a client certificate (mTLS)
    client_cert: Path | None = None  # what the readiness check presents when auth_clients is set
    client_key: Path | None = None


def _pong(port: int, password: str | None = None, tls: RedisTls | None = None) -> bool:
    """PING answered; a server with a password answers -NOAUTH, which also says it is up."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            s: socket.socket = raw
            if tls is not None:
                context = ssl.create_default_context(cafile=str(tls.ca))
                if tls.client_cert is not None and tls.client_key is not None:
                    context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
                s = context.wrap_socket(raw, server_hostname="127.0.0.1")
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH") if password else b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(
        self, directory: Path, binary: str, *, password: str | None = None, tls: RedisTls | None = None
    ) -> None:
        self.directory = directory
        self.binary = binary
        self.password = password
        self.tls = tls
        self.port = 0
        self.log = directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        self.port = _free_port()
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log),
        ]  # fmt: skip
        if self.password is not None:
            command += ["--requirepass", self.password]
        if self.tls is not None:
            command[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            command += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            command += ["--tls-ca-cert-file", str(self.tls.ca)]
            command += ["--tls-auth-clients", "yes" if self.tls.auth_clients else "no"]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise AssertionError(f"redis-server exited with {self._process.returncode}: {self._log_tail()}")
            if _pong(self.port, self.password, self.tls):
                return
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"redis-server not answering after {timeout}s: {self._log_tail()}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def _log_tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log.is_file() else "(no log)"
