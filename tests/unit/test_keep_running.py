"""ranker.tritonserver.KeepRunning over a fake server: restart when exited, back off when the start fails,
never after close()."""

from __future__ import annotations

import threading
import time

import pytest

from ranker.tritonserver import KeepRunning, TritonServerError


class FakeServer:
    """What KeepRunning uses of LocalTritonServer: running, pid, returncode, grpc_url, start(), stop()."""

    def __init__(self) -> None:
        self.running = True
        self.pid: int | None = 100
        self.returncode: int | None = None
        self.grpc_url = "127.0.0.1:8001"
        self.starts = 0
        self.stops = 0
        self.fail_starts = 0  # the next this many starts raise
        self.start_gate: threading.Event | None = None

    def die(self, code: int = -9) -> None:
        self.running, self.returncode = False, code

    def start(self) -> FakeServer:
        if self.start_gate is not None:
            self.start_gate.wait(5)
        self.starts += 1
        if self.fail_starts:
            self.fail_starts -= 1
            raise TritonServerError("tritonserver exited with code 1 during startup")
        self.running, self.returncode, self.pid = True, None, 100 + self.starts
        return self

    def stop(self) -> None:
        self.stops += 1
        self.running = False


def test_a_running_server_is_left_alone_and_an_exited_one_is_started_again() -> None:
    server = FakeServer()
    keeper = KeepRunning(server)  # type: ignore[arg-type]
    assert keeper.check() and server.starts == 0
    server.die()
    assert keeper.check() and server.starts == 1 and server.running
    assert keeper.restarts == 1 and server.pid == 101


def test_a_failed_start_waits_longer_each_time_and_a_success_resets_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    server = FakeServer()
    keeper = KeepRunning(server, min_wait_s=1.0, max_wait_s=4.0)  # type: ignore[arg-type]
    server.die()
    server.fail_starts = 4
    tries = []
    for _ in range(12):  # one check per second of fake time
        keeper.check()
        tries.append(server.starts)
        now[0] += 1.0
    # starts at t=0 (fails, wait 1), 1 (fails, wait 2), 3 (fails, wait 4), 7 (fails, wait 4), 11 (succeeds)
    assert tries == [1, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5]
    assert server.running and keeper.restarts == 1
    server.die()
    server.fail_starts = 1
    keeper.check()  # fails: the wait is back to 1 s after the success, not 4 s
    now[0] += 1.0
    assert keeper.check() and server.starts == 7


def test_close_stops_it_after_a_start_in_progress_and_nothing_starts_it_again() -> None:
    server = FakeServer()
    keeper = KeepRunning(server)  # type: ignore[arg-type]
    server.die()
    server.start_gate = threading.Event()
    checking = threading.Thread(target=keeper.check)
    checking.start()
    time.sleep(0.05)
    closing = threading.Thread(target=keeper.close)
    closing.start()
    time.sleep(0.05)
    assert server.stops == 0  # close() waits for the start in progress
    server.start_gate.set()
    checking.join(5)
    closing.join(5)
    assert server.starts == 1 and server.stops == 1 and not server.running
    assert not keeper.check() and server.starts == 1
