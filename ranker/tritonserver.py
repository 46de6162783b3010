"""Start and stop the tritonserver binary shipped in the nvidia-pytriton wheel (CPU, python backend)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ranker.errors import BackendUnavailable

log = logging.getLogger(__name__)

PYTRITON_DIST = "nvidia-pytriton"
CONTROL_MODES = ("none", "explicit")
LOG_TAIL_LINES = 40
# The python backend's shared-memory regions are files in /dev/shm named by this prefix, a random part per start
# (so that what one process left can be told apart) and the stub's own id.
SHM_FOLDER = Path("/dev/shm")
SHM_PREFIX = "ranker-triton-"
# The ranker's client pings Triton this often, also on an idle connection, to notice a server that went away
# (ranker.triton.CHANNEL_ARGS). Triton's defaults refuse such pings and close the connection with GOAWAY
# too_many_pings, so the server must permit them: the embedded server and deploy/base/triton.yaml pass these.
KEEPALIVE_TIME_MS = 10_000
TRITON_KEEPALIVE_ARGS = (
    "--grpc-keepalive-permit-without-calls=1",
    f"--grpc-http2-min-recv-ping-interval-without-data={KEEPALIVE_TIME_MS // 2}",
)


class TritonServerError(BackendUnavailable):
    """The local tritonserver could not be started or did not become ready."""

    def __init__(self, message: str) -> None:
        super().__init__("tritonserver", message)


def pytriton_dir() -> Path:
    """The installed pytriton package folder, found without importing it (it pulls in a lot)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError("nvidia-pytriton is not installed; install the 'offline' extra")
    return Path(next(iter(spec.submodule_search_locations)))


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "ranker" / "triton-backends"


def prepare_backends(cache_dir: Path | None = None) -> Path:
    """A writable backend directory with the python backend and the stub for this interpreter.

    The wheel keeps the stubs for all Python versions apart from the backend; Triton expects the
    stub next to libtriton_python.so. Built once per pytriton version in a temporary sibling and
    renamed into place, so concurrent starters never see a half-copied folder.
    """
    version = importlib.metadata.version(PYTRITON_DIST)
    target = (cache_dir or default_cache_dir()) / version / f"py{sys.version_info[0]}.{sys.version_info[1]}"
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    dist = pytriton_dir() / "tritonserver"
    stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"nvidia-pytriton {version} has no python backend stub for this Python: {stub}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=target.parent))
    try:
        shutil.copytree(dist / "backends", staging, dirs_exist_ok=True)
        shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is just as good
            if not (target / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(base: dict[str, str]) -> dict[str, str]:
    """The environment the server and its python stubs need.

    The stub links the system libpython, not the virtualenv's, so it only sees numpy and
    onnxruntime through PYTHONPATH / PATH pointing at this interpreter's environment.
    """
    env = dict(base)
    site = Path(sysconfig.get_paths()["purelib"])
    libs = site / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), base.get("LD_LIBRARY_PATH", "")) if p)
    site_dirs = dict.fromkeys([str(site), sysconfig.get_paths()["platlib"]])
    env["PYTHONPATH"] = os.pathsep.join([*site_dirs, *(p for p in [base.get("PYTHONPATH", "")] if p)])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", "")])
    return env


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def discover_models(repository: Path) -> list[str]:
    """Model names in a repository: folders holding a config.pbtxt or a configs/ folder."""
    return sorted(
        p.name
        for p in repository.iterdir()
        if p.is_dir() and ((p / "config.pbtxt").is_file() or (p / "configs").is_dir())
    )


class LocalTritonServer:
    """A tritonserver child process serving one model repository on free local ports.

    Used by the embedded CPU default and by the integration tests:

        with LocalTritonServer(repo) as server:
            TritonModels(server.grpc_url) ...

    In explicit model-control mode it loads only `models` at start; with none, and `model_repository`
    None (an empty folder), it starts empty and models are loaded through Triton's repository API, as
    the service does (ranker.swap).
    """

    def __init__(
        self,
        model_repository: Path | None,
        *,
        models: Sequence[str] = (),
        model_control_mode: str = "none",
        model_config_name: str | None = "cpu",
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 15.0,
        cache_dir: Path | None = None,
        log_file: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if model_control_mode not in CONTROL_MODES:
            raise ValueError(f"model_control_mode must be one of {CONTROL_MODES}, got {model_control_mode!r}")
        if model_repository is None and model_control_mode != "explicit":
            raise ValueError("without a model repository the server must use model_control_mode 'explicit'")
        self._own_repository = model_repository is None
        if model_repository is None:
            model_repository = Path(tempfile.mkdtemp(prefix="ranker-triton-repository-"))
        self.model_repository = Path(model_repository).resolve()
        self.models = list(models)
        self.model_control_mode = model_control_mode
        self.model_config_name = model_config_name
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.cache_dir = cache_dir
        self.log_file = log_file
        self.extra_args = list(extra_args)
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.shm_prefix: str | None = None  # the python backend's region names of the last process started

    @property
    def grpc_url(self) -> str:
        if self.grpc_port is None:
            raise RuntimeError("the server has not been started")
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        if self.http_port is None:
            raise RuntimeError("the server has not been started")
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last process started, None while it runs (or before any start)."""
        return self._process.poll() if self._process is not None else None

    def command(self, backend_dir: Path) -> list[str]:
        binary = pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
        args = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control_mode}",
            "--log-verbose=0",
            "--exit-on-error=true",
            "--strict-readiness=true",
            *TRITON_KEEPALIVE_ARGS,
        ]
        if self.model_config_name:
            args.append(f"--model-config-name={self.model_config_name}")
        if self.shm_prefix:
            args.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        if self.model_control_mode == "explicit":
            args += [f"--load-model={m}" for m in self.models]
        return args + self.extra_args

    def start(self) -> LocalTritonServer:
        """Start the server and block until it and every expected model are ready."""
        if self.running:
            return self
        if self._own_repository:
            self.model_repository.mkdir(parents=True, exist_ok=True)
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} does not exist")
        backend_dir = prepare_backends(self.cache_dir)
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        if self.log_file is None:
            self.log_file = Path(tempfile.mkdtemp(prefix="ranker-triton-")) / "tritonserver.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._release_leftovers()  # of a previous process that exited by itself (a crash, the OOM killer)
        self.shm_prefix = f"{SHM_PREFIX}{secrets.token_hex(6)}-"
        started = time.monotonic()
        with self.log_file.open("wb") as log:
            # The child keeps its own copy of the log descriptor. In a process group of its own, with the python
            # backend's stubs it starts, so that the stubs can be stopped with it (_release_leftovers).
            self._process = subprocess.Popen(
                self.command(backend_dir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=server_env(dict(os.environ)),
                start_new_session=True,
            )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _expected_models(self) -> list[str]:
        if self.model_control_mode == "explicit":
            return self.models  # possibly none: models are loaded later through the repository API
        return self.models or discover_models(self.model_repository)

    def _wait_ready(self, started: float) -> None:
        models = self._expected_models()
        urls = [f"{self.http_url}/v2/health/ready"] + [f"{self.http_url}/v2/models/{m}/ready" for m in models]
        while True:
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                raise TritonServerError(self._failure(f"tritonserver exited with code {code} during startup"))
            if all(_http_ok(url) for url in urls):
                return
            if time.monotonic() - started > self.startup_timeout:
                raise TritonServerError(
                    self._failure(f"tritonserver not ready after {self.startup_timeout:.0f} s (models {models})")
                )
            time.sleep(0.1)

    def _failure(self, message: str) -> str:
        assert self.log_file is not None
        return f"{message}; last lines of {self.log_file}:\n{log_tail(self.log_file)}"

    def stop(self) -> None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL after stop_timeout."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        self._release_leftovers()
        self._process = None
        if self._own_repository:  # empty: models loaded through the API live in Triton's own temporary folders
            shutil.rmtree(self.model_repository, ignore_errors=True)

    def _release_leftovers(self) -> None:
        """Stop the python backend stubs and remove the shared memory of the last process, once it has exited.

        A stub notices that its server is gone and exits by itself, but not always: after a server that hung
        and was then killed under load, the encoder's stub stayed, blocked in its exit with its model in memory
        (tests/integration/test_faults.py). A stub killed with the server leaves its /dev/shm region behind.
        Each restart would add to both, and a container's /dev/shm is often only 64 MB."""
        process, prefix = self._process, self.shm_prefix
        if process is None or process.poll() is None:
            return
        # The group is the dead server's pid: a pid is not reused while a group of that id has members.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if prefix:
            for region in SHM_FOLDER.glob(f"{prefix}*"):
                region.unlink(missing_ok=True)

    def model_config(self, model: str) -> dict[str, object]:
        """The config Triton actually loaded for a model (shows which variant was picked)."""
        with urllib.request.urlopen(f"{self.http_url}/v2/models/{model}/config", timeout=5.0) as response:
            return dict(json.loads(response.read()))

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class KeepRunning:
    """Starts an embedded LocalTritonServer again whenever it has exited (a crash, the OOM killer), on the same
    ports, so that the rankers using it recover by themselves: each reloads its release's models into the new
    server within seconds (ranker.swap.ReleaseSwitch.keep_loaded) and answers degraded until then.

    check() is cheap while the server runs and blocks for a start (seconds) when it does not; a start that
    fails is retried after a wait that doubles from `min_wait_s` to `max_wait_s`. close() stops the server, after
    a start in progress if there is one, and no check starts it again."""

    def __init__(self, server: LocalTritonServer, *, min_wait_s: float = 1.0, max_wait_s: float = 30.0) -> None:
        self.server = server
        self.restarts = 0
        self._min_wait_s = min_wait_s
        self._max_wait_s = max_wait_s
        self._wait_s = min_wait_s
        self._next_try = 0.0
        self._lock = threading.Lock()
        self._closed = False

    def check(self) -> bool:
        """Whether the server runs, after starting it again if it had exited and its wait is over."""
        with self._lock:
            if self._closed:
                return False
            if self.server.running:
                self._wait_s = self._min_wait_s
                return True
            if time.monotonic() < self._next_try:
                return False
            log.error(
                "the embedded tritonserver (pid %s) exited with %s: starting it again",
                self.server.pid,
                self.server.returncode,
            )
            try:
                self.server.start()
            except TritonServerError as e:
                log.error("the embedded tritonserver did not start again (next try in %.0f s): %s", self._wait_s, e)
                self._next_try = time.monotonic() + self._wait_s
                self._wait_s = min(2 * self._wait_s, self._max_wait_s)
                return False
            self.restarts += 1
            self._wait_s = self._min_wait_s
            log.info("embedded tritonserver running again at %s (pid %s)", self.server.grpc_url, self.server.pid)
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.server.stop()
