"""`ranker serve` with RANKER_WORKERS=N > 1: N ranker processes on one port, one Triton.

A ranker process runs each Rank's CPU stages (retrieval, features, blending, diversity) on its event loop, one
request at a time, so one process uses about one core. On a machine or pod with more cores, N processes serve
more: gRPC binds its ports with SO_REUSEPORT, and the kernel hands each new connection to one of the processes
listening. It balances connections, not calls: a client with one channel stays on one worker, so spread load
over several channels (or clients).

This module is the supervisor, the process `ranker serve` becomes when workers > 1:

1. it starts the embedded tritonserver when RANKER_TRITON_URL is 'embedded' (every worker then shares it), and
   starts it again when it exits (ranker.tritonserver.KeepRunning);
2. it starts the workers one after another, each `python -m ranker serve` with the same settings plus its
   index, the Triton URL, its own metrics port (metrics_port + index) and one end of a socket pair to the
   supervisor. Each loads the release, pushes its models into Triton (the second push of the same models is
   a no-op) and says on the socket when it serves; only then does the next one start, so that they do not
   all load at once;
3. SIGTERM or SIGINT is passed on to every worker, which drains as a single ranker does (a second signal
   cuts the drain short); once they have all exited, Triton is stopped;
4. a worker that exits by itself (a crash, the OOM killer) is started again while the others serve on; more
   than MAX_RESTARTS such exits within RESTART_WINDOW_S, or a worker that exits again before it serves, is a
   crash loop: the supervisor stops the others and exits 1, for the orchestrator to restart the whole set;
5. RankerAdmin.LoadRelease, whichever worker takes it, is a roll of the whole set (WorkerReleases, roll): a
   new set of workers starts on the new release beside the old one, one after another, and once all of them
   serve the call answers and the old set drains and stops; then the old release's models are unloaded from
   Triton (RANKER_RELEASE_KEEP_PREVIOUS keeps as many previous releases loaded, as a single ranker does). A
   new worker that exits before it serves ends the roll: the others are stopped, the old set serves on, and
   the call answers FAILED_PRECONDITION. Both sets serve during the switch, as in a rolling restart.

Workers share nothing in memory, so the settings validation (ranker.config) requires the profile and catalog
stores on Redis: an event or catalog change taken by one worker reaches the others as it reaches other replicas.
A worker whose supervisor is gone stops itself (watch_supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ranker.config import ENV_PREFIX, Settings
from ranker.errors import BackendError, Busy, NotConfigured
from ranker.tritonserver import KeepRunning, LocalTritonServer

if TYPE_CHECKING:  # the worker's side; the supervisor stays free of the pipeline's imports
    from ranker.swap import ReleaseStamp, ReleaseSwitch, Swapped

log = logging.getLogger(__name__)

POLL_S = 0.2
MAX_RESTARTS = 3  # worker exits within RESTART_WINDOW_S that are restarted; one more stops the set
RESTART_WINDOW_S = 60.0
CONTROL_FD = ENV_PREFIX + "WORKER_CONTROL_FD"


# --- the worker's side ------------------------------------------------------------------------------------


class SupervisorLink:
    """A worker's end of its socket to the supervisor: one JSON object per line each way. The worker says once
    that it serves ({"serving": ...}), then asks for release rolls ({"load": path}), one at a time, each
    answered by {"swapped": ...} or {"error": ...}."""

    def __init__(self, fd: int) -> None:
        self._socket = socket.socket(fileno=fd)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def serving(self, switch: ReleaseSwitch) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self._socket)
        stamp = switch.serving
        pushed = switch.model_loading == "push"
        await self._send(
            {"serving": {**_stamp_json(stamp), "triton_models": list(switch.triton_names) if pushed else []}}
        )

    async def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send `message` and wait for the answer (one request at a time: WorkerReleases sees to it)."""
        await self._send(message)
        assert self._reader is not None, "serving() first"
        line = await self._reader.readline()
        if not line:
            raise NotConfigured("the worker supervisor is gone: this worker is stopping")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def _send(self, message: Mapping[str, Any]) -> None:
        assert self._writer is not None, "serving() first"
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()


class WorkerReleases:
    """RankerAdmin.LoadRelease in a worker (ranker.service.ReleaseLoader): the supervisor rolls the whole set."""

    def __init__(self, switch: ReleaseSwitch, link: SupervisorLink) -> None:
        self._switch = switch
        self._link = link
        self._loading: Path | None = None

    async def load(self, path: Path) -> Swapped:
        """As ReleaseSwitch.load: one at a time (Busy), and it runs on when its caller goes away, so that the
        supervisor's answer is read by the call that asked for it."""
        if self._loading is not None:
            raise Busy(f"a release load is already running ({self._loading}); retry when it has finished")
        self._loading = path
        task = asyncio.create_task(self._load(path))
        task.add_done_callback(self._load_done)
        return await asyncio.shield(task)

    def _load_done(self, task: asyncio.Task[Swapped]) -> None:
        self._loading = None
        if not task.cancelled():
            task.exception()  # retrieved here too: the caller may have gone away

    async def _load(self, path: Path) -> Swapped:
        from ranker.release import read_manifest
        from ranker.swap import Swapped

        started = time.perf_counter()
        if self._switch.model_loading == "preloaded":
            raise NotConfigured(
                "release swaps need the ranker to load models into Triton: run Triton with "
                "--model-control-mode=explicit (RANKER_TRITON_MODELS=push or auto)"
            )
        manifest = await asyncio.to_thread(read_manifest, path)  # NotFound before anything starts
        serving = self._switch.serving
        if manifest.release_id == serving.release_id:
            log.info("release %s from %s is already serving; nothing to roll", serving.release_id, path)
            return Swapped(previous=serving, current=serving, millis=_ms(started))
        reply = await self._link.request({"load": str(path.resolve())})
        if "error" in reply:
            error = reply["error"]
            raise (Busy if error["code"] == "ABORTED" else NotConfigured)(error["message"])
        swapped = reply["swapped"]
        return Swapped(
            previous=_stamp(swapped["previous"]),
            current=_stamp(swapped["current"]),
            millis=_ms(started),
            steps_ms=swapped["steps_ms"],
        )


async def watch_supervisor(every_s: float = 1.0) -> None:
    """Send this worker SIGTERM when its supervisor is gone (re-parented), so that it drains and exits instead of
    serving on, unsupervised, with a Triton that has stopped."""
    supervisor = os.getppid()
    while os.getppid() == supervisor:
        await asyncio.sleep(every_s)
    log.error("the supervisor (pid %d) is gone: stopping", supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


def _stamp_json(stamp: ReleaseStamp) -> dict[str, Any]:
    return {"release_id": stamp.release_id, "model_versions": dict(stamp.model_versions)}


def _stamp(data: Mapping[str, Any]) -> ReleaseStamp:
    from ranker.swap import ReleaseStamp

    return ReleaseStamp(release_id=data["release_id"], model_versions=dict(data["model_versions"]))


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


# --- the supervisor ---------------------------------------------------------------------------------------


@dataclass
class Worker:
    """A worker process, the supervisor's end of its socket, and what it said when it began to serve."""

    index: int
    process: subprocess.Popen[bytes]
    link: socket.socket
    serving: dict[str, Any] = field(default_factory=dict)
    buffer: bytes = b""
    closed: bool = False  # its end of the socket is closed (it has exited or is exiting)

    @property
    def stamp(self) -> dict[str, Any]:
        """The release it serves, as a LoadRelease answer names it (release_id, model_versions)."""
        return {k: self.serving[k] for k in ("release_id", "model_versions")}

    def messages(self) -> list[dict[str, Any]]:
        """The complete messages it has sent since the last call (the socket is readable)."""
        data = self.link.recv(65536)
        if not data:
            self.closed = True
            return []
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def reply(self, message: Mapping[str, Any]) -> None:
        with contextlib.suppress(OSError):  # it has gone: nobody is waiting for the answer
            self.link.sendall(json.dumps(message).encode() + b"\n")


class Supervisor:
    """The worker processes of one `ranker serve` (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.release = settings.release
        self.workers: list[Worker] = []  # serving, by index
        self.starting: list[Worker] = []  # started and not serving yet, or the new set of a roll
        self.previous: list[list[str]] = []  # Triton models of replaced releases still loaded, oldest first
        self.triton: KeepRunning | None = None  # the embedded tritonserver
        self.stopping = False
        self.signals = 0

    def environment(self, index: int, triton_url: str, control_fd: int, release: Path | None = None) -> dict[str, str]:
        """Worker `index`'s environment: the supervisor's, with the resolved release, address and Triton, and
        the worker's own index, socket and metrics port."""
        settings = self.settings
        env = {k: v for k, v in os.environ.items() if k != CONTROL_FD}
        env.update(
            {
                ENV_PREFIX + "RELEASE": str(release or self.release),
                ENV_PREFIX + "HOST": settings.host,
                ENV_PREFIX + "PORT": str(settings.port),
                ENV_PREFIX + "WORKERS": str(settings.workers),
                ENV_PREFIX + "WORKER_INDEX": str(index),
                CONTROL_FD: str(control_fd),
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
        for worker in [*self.workers, *self.starting]:
            if worker.process.poll() is None:
                worker.process.send_signal(signum)

    def run(self) -> int:
        """Start Triton and the workers, supervise them until a signal or a crash loop; the exit status."""
        settings = self.settings
        if self.release is None:
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
                self.workers = self._start_set(triton_url, self.release) or []
                if self.workers:
                    log.info("%d workers serving on %s:%d", settings.workers, settings.host, settings.port)
                    status = self._supervise(triton_url)
                else:
                    status = 0 if self.stopping else 1  # a signal while starting, or a worker that could not start
            finally:
                clean = self._stop(self.workers + self.starting, signal_them=self.signals == 0)
        return status if clean or status else 1

    @contextlib.contextmanager
    def _triton(self) -> Iterator[str]:
        if self.settings.triton_url != "embedded":
            yield self.settings.triton_url
            return
        local = LocalTritonServer(None, model_control_mode="explicit", model_config_name=None)
        local.start()
        log.info("embedded tritonserver ready at %s (pid %s), shared by the workers", local.grpc_url, local.pid)
        self.triton = KeepRunning(local)
        try:
            yield local.grpc_url
        finally:
            self.triton.close()

    def _start_set(self, triton_url: str, release: Path) -> list[Worker] | None:
        """Workers 0..N-1 on `release`, each started once the previous one serves; None when one exits before it
        serves or a signal comes (those started stay in self.starting, for the caller to stop)."""
        started: list[Worker] = []
        for index in range(self.settings.workers):
            worker = None if self.stopping else self._start(index, triton_url, release)
            if worker is None:
                return None
            started.append(worker)
        self.starting = [w for w in self.starting if w not in started]
        return started

    def _start(self, index: int, triton_url: str, release: Path) -> Worker | None:
        """Start worker `index` and wait until it serves; None when it exited first (or a signal came)."""
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "ranker", "serve"],
                env=self.environment(index, triton_url, theirs.fileno(), release),
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                process_group=0,  # a terminal's Ctrl-C reaches the supervisor only, which passes it on once
            )
        finally:
            theirs.close()
        worker = Worker(index=index, process=process, link=ours)
        self.starting.append(worker)
        log.info("worker %d started (pid %d) on release %s", index, process.pid, release)
        while not self.stopping and not worker.closed:
            readable, _, _ = select.select([ours], [], [], POLL_S)
            for message in worker.messages() if readable else []:
                if "serving" in message:
                    worker.serving = message["serving"]
                    log.info("worker %d (pid %d) serving release %s", index, process.pid, worker.serving["release_id"])
                    return worker
        if not self.stopping:
            process.wait()
            log.error("worker %d (pid %d) exited with %s before it served", index, process.pid, process.returncode)
        return None

    def _supervise(self, triton_url: str) -> int:
        """Until a signal: 0. Restarts a worker that exits by itself, rolls the set to a release a worker asks for;
        a crash loop (see the module docstring) is 1."""
        exits: list[float] = []
        while not self.stopping:
            if self.triton is not None:
                self.triton.check()  # the embedded one: started again when it has exited
            for worker in list(self.workers):
                if worker.process.poll() is None or self.stopping:
                    continue
                now = time.monotonic()
                exits = [t for t in exits if now - t < RESTART_WINDOW_S] + [now]
                log.error(
                    "worker %d (pid %d) exited with %s", worker.index, worker.process.pid, worker.process.returncode
                )
                worker.link.close()
                if len(exits) > MAX_RESTARTS:
                    log.error("%d worker exits within %.0f s: stopping the set", len(exits), RESTART_WINDOW_S)
                    return 1
                assert self.release is not None
                restarted = self._start(worker.index, triton_url, self.release)
                if restarted is None:
                    return 0 if self.stopping else 1
                self.starting.remove(restarted)
                self.workers[worker.index] = restarted
            asked = self._next_load()
            if asked is not None and not self.stopping:
                self._roll(triton_url, *asked)
        return 0

    def _next_load(self) -> tuple[Path, Worker] | None:
        """The first release load a serving worker asks for within POLL_S (other loads in the same wait are
        answered by _answer_waiting once the roll has run)."""
        listening = [w for w in self.workers if not w.closed]
        readable, _, _ = select.select([w.link for w in listening], [], [], POLL_S)
        for worker in [w for w in listening if w.link in readable]:
            for message in worker.messages():
                if "load" in message:
                    return Path(message["load"]), worker
        return None

    def _roll(self, triton_url: str, release: Path, asker: Worker) -> None:
        """Replace the set by one on `release` (see the module docstring); answer `asker` once the new set serves
        or the roll has failed."""
        started = time.monotonic()
        old = self.workers
        previous = old[0].stamp
        log.info("rolling %d workers from release %s to %s", len(old), previous["release_id"], release)
        new = self._start_set(triton_url, release)
        if new is None:
            self._stop(self.starting, signal_them=True)
            self.starting = []
            why = "the supervisor is stopping" if self.stopping else "a worker exited before it served (its log above)"
            asker.reply({"error": {"code": "FAILED_PRECONDITION", "message": f"release {release} did not start: {why}; "
                                   f"release {previous['release_id']} serves on"}})  # fmt: skip
            return
        current = new[0].stamp
        start_ms = (time.monotonic() - started) * 1000.0
        self.workers, self.release = new, release
        swapped = {"swapped": {"previous": previous, "current": current, "steps_ms": {"start": start_ms}}}
        asker.reply(swapped)
        self._answer_waiting(old, release, swapped)
        self._stop(old, signal_them=True)
        log.info("rolled to release %s in %.0f ms", current["release_id"], (time.monotonic() - started) * 1000.0)
        self._unload_previous(triton_url, old[0].serving.get("triton_models", []), new[0].serving["triton_models"])

    def _answer_waiting(self, old: list[Worker], release: Path, swapped: Mapping[str, Any]) -> None:
        """Loads other old workers asked for during the roll: the roll's answer for the same release, ABORTED for
        another (their workers are about to stop, so nobody would answer them)."""
        listening = [w for w in old if not w.closed]
        readable, _, _ = select.select([w.link for w in listening], [], [], 0)
        for worker in [w for w in listening if w.link in readable]:
            for message in worker.messages():
                if "load" not in message:
                    continue
                if Path(message["load"]) == release:
                    worker.reply(swapped)
                else:
                    why = f"a roll to {release} ran meanwhile; retry if you want {message['load']}"
                    worker.reply({"error": {"code": "ABORTED", "message": why}})

    def _unload_previous(self, triton_url: str, replaced: list[str], serving: list[str]) -> None:
        """Keep RANKER_RELEASE_KEEP_PREVIOUS replaced releases' models in Triton, unload older ones."""
        self.previous = [names for names in self.previous if not set(names) & set(serving)]
        if replaced and not set(replaced) & set(serving):
            self.previous.append(replaced)
        keep = self.settings.release_keep_previous
        retired, self.previous = self.previous[: len(self.previous) - keep], self.previous[len(self.previous) - keep :]
        if retired:
            asyncio.run(_unload(triton_url, [name for names in retired for name in names]))

    def _stop(self, workers: list[Worker], *, signal_them: bool) -> bool:
        """Stop `workers` (SIGTERM now, or a signal already passed on) and wait for them; whether all stopped
        cleanly. Their own drain and grace bound the wait; one still there after both and a margin is killed."""
        if signal_them:
            for worker in workers:
                if worker.process.poll() is None:
                    worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_s + self.settings.grace_s + 30.0
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop in time: killing it", worker.index, worker.process.pid)
                worker.process.kill()
                worker.process.wait()
            worker.link.close()
        statuses = [w.process.returncode for w in workers]
        if workers:
            log.info("workers %s stopped (exit statuses %s)", [w.process.pid for w in workers], statuses)
        return all(status in (0, -signal.SIGTERM, -signal.SIGINT) for status in statuses)


async def _unload(triton_url: str, names: list[str]) -> None:
    from ranker.triton import TritonModels

    models = TritonModels(triton_url)
    try:
        for name in names:
            try:
                await models.unload_model(name, timeout=60.0)
                log.info("unloaded %s from Triton (a replaced release's model)", name)
            except BackendError as e:  # the new release serves; a model left loaded only costs memory
                log.warning("could not unload %s from Triton: %s", name, e)
    finally:
        await models.close()


def supervise(settings: Settings) -> int:
    return Supervisor(settings).run()
