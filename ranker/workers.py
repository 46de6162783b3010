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
4. a worker that exits by itself (a crash, the OOM killer) is started again while the others serve on; more
   than MAX_RESTARTS such exits within RESTART_WINDOW_S, or a worker that exits again before it serves, is a
   crash loop: the supervisor stops the others and exits 1, for the orchestrator to restart the whole set.

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
MAX_RESTARTS = 3  # worker exits within RESTART_WINDOW_S that are restarted; one more stops the set
RESTART_WINDOW_S = 60.0


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
        self.workers: list[subprocess.Popen[bytes]] = []  # serving, by index
        self.starting: subprocess.Popen[bytes] | None = None  # started, not yet serving
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
        for worker in [*self.workers, *([self.starting] if self.starting is not None else [])]:
            if worker.poll() is None:
                worker.send_signal(signum)

    def run(self) -> int:
        """Start Triton and the workers, supervise them until a signal or a crash loop; the exit status."""
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
            try:
                for index in range(settings.workers):
                    worker = None if self.stopping else self._start(index, triton_url)
                    if worker is None:
                        break
                    self.workers.append(worker)
                else:
                    log.info("%d workers serving on %s:%d", settings.workers, settings.host, settings.port)
                if len(self.workers) == settings.workers:
                    status = self._supervise(triton_url)
                else:
                    status = 0 if self.stopping else 1  # a signal while starting, or a worker that could not start
            finally:
                clean = self._stop_all()
        return status if clean or status else 1

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

    def _start(self, index: int, triton_url: str) -> subprocess.Popen[bytes] | None:
        """Start worker `index` and wait until it serves; None when it exited first (or a signal came: then it is
        stopped)."""
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
        self.starting = worker
        log.info("worker %d started (pid %d)", index, worker.pid)
        try:
            with open(read_end, "rb", buffering=0) as ready:
                while not self.stopping:
                    readable, _, _ = select.select([ready], [], [], POLL_S)
                    if readable:
                        if ready.read(1) == READY:
                            log.info("worker %d (pid %d) serving", index, worker.pid)
                            return worker
                        break  # end of file: the worker exited before it served
        finally:
            self.starting = None
        worker.terminate()  # no-op when it has exited; a signal came otherwise
        worker.wait()
        if not self.stopping:
            log.error("worker %d (pid %d) exited with %s before it served", index, worker.pid, worker.returncode)
        return None

    def _supervise(self, triton_url: str) -> int:
        """Until a signal: 0, or 1 when a worker failed to stop cleanly. A worker that exits by itself is started
        again; more than MAX_RESTARTS exits within RESTART_WINDOW_S, or a restart that never serves, is a crash
        loop: 1, for the orchestrator to restart the whole set."""
        exits: list[float] = []
        while not self.stopping:
            for index, worker in enumerate(self.workers):
                if worker.poll() is None or self.stopping:
                    continue
                now = time.monotonic()
                exits = [t for t in exits if now - t < RESTART_WINDOW_S] + [now]
                log.error("worker %d (pid %d) exited with %s", index, worker.pid, worker.returncode)
                if len(exits) > MAX_RESTARTS:
                    log.error("%d worker exits within %.0f s: stopping the set", len(exits), RESTART_WINDOW_S)
                    return 1
                restarted = self._start(index, triton_url)
                if restarted is None:
                    return 0 if self.stopping else 1
                self.workers[index] = restarted
            time.sleep(POLL_S)
        return 0

    def _stop_all(self) -> bool:
        """Stop the workers (a signal has already been passed on to them, or SIGTERM now); whether all of them
        stopped cleanly."""
        if self.signals == 0:
            for worker in self.workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
        self._wait_all()
        statuses = [w.returncode for w in self.workers]
        log.info("workers stopped (exit statuses %s)", statuses)
        return all(status in (0, -signal.SIGTERM, -signal.SIGINT) for status in statuses)

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
