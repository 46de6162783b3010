"""`ranker serve` with RANKER_WORKERS=N > 1: N ranker processes on one port, one Triton.

A ranker process runs each Rank's CPU stages (retrieval, features, blending, diversity) on its event loop, one
request at a time, so one process uses about one core. On a machine or pod with more cores, N processes serve
more: gRPC binds its ports with SO_REUSEPORT, and the kernel hands each new connection to one of the processes
listening. It balances connections, not calls: a client with one channel stays on one worker, so spread load
over several channels (or clients).

This module is the supervisor, the process `ranker serve` becomes when workers > 1:

1. it starts the embedded tritonserver when RANKER_TRITON_URL is 'embedded' (every worker then shares it);
2. it starts the workers one after another, each `python -m ranker serve` with the same settings plus its
   index, the Triton URL, and its own metrics port (metrics_port + index); each loads the release and pushes
   its models into Triton (the second push of the same models is a no-op) and reports on a pipe once it
   serves, and only then does the next start, so that they do not all load at once;
3. SIGTERM or SIGINT is passed on to every worker, which drains as a single ranker does (a second signal
   cuts the drain short); once they have all exited, Triton is stopped;
4. when a worker exits by itself, the supervisor stops the others and exits 1, for the orchestrator to
   restart the whole set: a half-size set would still look healthy through the survivors.

Workers share nothing in memory, so the settings validation (ranker.config) requires the profile and catalog
stores on Redis: an event or catalog change taken by one worker reaches the others as it reaches other replicas.
RankerAdmin.LoadRelease is refused in a worker (FAILED_PRECONDITION), as it would swap only the worker it
reached; a new release is a restart. A worker whose supervisor is gone stops itself (watch_supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import FrameType

from ranker.config import ENV_PREFIX, Settings
from ranker.tritonserver import LocalTritonServer

log = logging.getLogger(__name__)

POLL_S = 0.2
READY = b"1"


def notify_ready(fd: int) -> None:
    """Tell the supervisor this worker serves (settings.worker_ready_fd), once."""
    try:
        os.write(fd, READY)
    finally:
        os.close(fd)


async def watch_supervisor(every_s: float = 1.0) -> None:
    """Send this worker SIGTERM when its supervisor is gone (re-parented), so that it drains and exits instead of
    serving on, unsupervised, with a Triton that has stopped."""
    supervisor = os.getppid()
    while os.getppid() == supervisor:
        await asyncio.sleep(every_s)
    log.error("the supervisor (pid %d) is gone: stopping", supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """The worker processes of one `ranker serve` (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        self.signals = 0

    def environment(self, index: int, triton_url: str, ready_fd: int) -> dict[str, str]:
        """Worker `index`'s environment: the supervisor's, with the resolved release, address and Triton, and
        the worker's own index, pipe and metrics port."""
        settings = self.settings
        env = {k: v for k, v in os.environ.items() if k != ENV_PREFIX + "WORKER_READY_FD"}
        env.update(
            {
                ENV_PREFIX + "RELEASE": str(settings.release),
                ENV_PREFIX + "HOST": settings.host,
                ENV_PREFIX + "PORT": str(settings.port),
                ENV_PREFIX + "WORKERS": str(settings.workers),
                ENV_PREFIX + "WORKER_INDEX": str(index),
                ENV_PREFIX + "WORKER_READY_FD": str(ready_fd),
                ENV_PREFIX + "TRITON_URL": triton_url,
                ENV_PREFIX + "METRICS_PORT": str(settings.metrics_port + index if settings.metrics_port else 0),
            }
        )
        if settings.triton_url == "embedded" and settings.triton_config_name is None:
            env[ENV_PREFIX + "TRITON_CONFIG_NAME"] = "cpu"  # what a single ranker loads into its embedded Triton
        return env

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        self.signals += 1
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    def run(self) -> int:
        """Start Triton and the workers, supervise them until a signal or a worker's exit; the exit status."""
        settings = self.settings
        if settings.release is None:
            raise SystemExit("no release: pass --release DIR or set RANKER_RELEASE")
        if settings.triton_url == "embedded" and settings.triton_models == "preloaded":
            raise SystemExit(
                "workers > 1 with the embedded tritonserver: each worker loads the release's models into it, so "
                "RANKER_TRITON_MODELS must be push or auto, not preloaded"
            )
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signal)
        with self._triton() as triton_url:
            for index in range(settings.workers):
                if self.stopping or not self._start(index, triton_url):
                    break
            else:
                log.info("%d workers serving on %s:%d", settings.workers, settings.host, settings.port)
            status = self._supervise()
        return status

    @contextlib.contextmanager
    def _triton(self) -> Iterator[str]:
        if self.settings.triton_url != "embedded":
            yield self.settings.triton_url
            return
        local = LocalTritonServer(None, model_control_mode="explicit", model_config_name=None)
        local.start()
        log.info("embedded tritonserver ready at %s (pid %s), shared by the workers", local.grpc_url, local.pid)
        try:
            yield local.grpc_url
        finally:
            local.stop()

    def _start(self, index: int, triton_url: str) -> bool:
        """Start worker `index` and wait until it serves; False when it exited first or a signal came."""
        read_end, write_end = os.pipe()
        try:
            worker = subprocess.Popen(
                [sys.executable, "-m", "ranker", "serve"],
                env=self.environment(index, triton_url, write_end),
                pass_fds=(write_end,),
                stdin=subprocess.DEVNULL,
                process_group=0,  # a terminal's Ctrl-C reaches the supervisor only, which passes it on once
            )
        finally:
            os.close(write_end)
        self.workers.append(worker)
        log.info("worker %d started (pid %d)", index, worker.pid)
        with open(read_end, "rb", buffering=0) as ready:
            while not self.stopping:
                readable, _, _ = select.select([ready], [], [], POLL_S)
                if readable:
                    if ready.read(1) == READY:
                        log.info("worker %d (pid %d) serving", index, worker.pid)
                        return True
                    break  # end of file: the worker exited before it served
        return False

    def _supervise(self) -> int:
        """Wait for a signal (pass it on, wait for every worker) or a worker's own exit (stop the rest)."""
        while not self.stopping:
            exited = [(i, w) for i, w in enumerate(self.workers) if w.poll() is not None]
            if exited:
                index, worker = exited[0]
                log.error(
                    "worker %d (pid %d) exited with %s: stopping the others", index, worker.pid, worker.returncode
                )
                self.stopping = True
                for other in self.workers:
                    if other.poll() is None:
                        other.terminate()
                self._wait_all()
                return 1
            time.sleep(POLL_S)
        self._wait_all()
        failed = [w.returncode for w in self.workers if w.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)]
        log.info("workers stopped (exit statuses %s)", [w.returncode for w in self.workers])
        return 1 if failed else 0

    def _wait_all(self) -> None:
        """Until every worker has exited. Their own grace and drain bound that; a worker still there after both
        and a margin is killed."""
        deadline = time.monotonic() + self.settings.drain_s + self.settings.grace_s + 30.0
        for worker in self.workers:
            try:
                worker.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time: killing it", worker.pid)
                worker.kill()
                worker.wait()


def supervise(settings: Settings) -> int:
    return Supervisor(settings).run()
