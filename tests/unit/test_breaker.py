"""Circuit breaker: opens after consecutive failures, fails fast, probes one call, closes by itself."""

from __future__ import annotations

import pytest

from ranker.breaker import MIN_COUNTED_TIMEOUT_S, CircuitBreaker, State
from ranker.errors import BackendFailed, BackendTimeout, BackendUnavailable, CircuitOpen


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker("triton:ranker", failures=3, cooldown_s=1.0, max_cooldown_s=4.0, clock=clock)


DOWN = BackendUnavailable("triton:ranker", "connection refused")


def opened(clock: Clock) -> CircuitBreaker:
    """A breaker that has just opened: three calls in a row found the backend down."""
    b = breaker(clock)
    for _ in range(3):
        b.before_call()
        b.failed(DOWN)
    assert b.state is State.OPEN
    return b


def test_opens_after_consecutive_failures_and_fails_fast() -> None:
    b = breaker(Clock())
    for _ in range(2):
        b.before_call()
        b.failed(DOWN)
    assert b.state is State.CLOSED
    b.before_call()
    b.failed(BackendTimeout("triton:ranker", "deadline"))
    assert b.state is State.OPEN
    with pytest.raises(CircuitOpen, match="circuit open"):
        b.before_call()


def test_timeouts_of_calls_with_almost_no_budget_do_not_count() -> None:
    b = breaker(Clock())
    for _ in range(10):  # callers whose own deadlines left a few milliseconds
        b.before_call()
        b.failed(BackendTimeout("triton:ranker", "deadline"), timeout=MIN_COUNTED_TIMEOUT_S / 4)
    assert b.state is State.CLOSED
    for _ in range(3):
        b.before_call()
        b.failed(BackendTimeout("triton:ranker", "deadline"), timeout=1.0)
    assert b.state is State.OPEN


def test_late_failures_of_calls_sent_before_the_trip_leave_the_probe_alone() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now += 1.0
    assert b.before_call()  # the probe
    b.failed(RuntimeError("cancelled"))  # an older call, not the probe, ends
    b.failed(DOWN)  # another older call times out late
    assert b.state is State.HALF_OPEN
    with pytest.raises(CircuitOpen, match="probe in flight"):
        b.before_call()  # still one probe at a time
    b.succeeded()
    assert b.state is State.CLOSED


def test_a_success_resets_the_count() -> None:
    b = breaker(Clock())
    for _ in range(5):  # fail, fail, succeed: never three in a row
        for outcome in (DOWN, DOWN, None):
            b.before_call()
            b.failed(outcome) if outcome else b.succeeded()
    assert b.state is State.CLOSED


def test_error_answers_do_not_open_it() -> None:
    b = breaker(Clock())
    for _ in range(10):
        b.before_call()
        b.failed(BackendFailed("triton:ranker", "bad input shape"))
    assert b.state is State.CLOSED


def test_half_open_lets_one_probe_through_and_recovers() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now += 1.0
    b.before_call()  # the probe
    assert b.state is State.HALF_OPEN
    with pytest.raises(BackendUnavailable, match="probe in flight"):
        b.before_call()
    b.succeeded()
    assert b.state is State.CLOSED
    b.before_call()


def test_failed_probe_doubles_the_cooldown_up_to_the_limit() -> None:
    clock = Clock()
    b = opened(clock)
    for cooldown in (2.0, 4.0, 4.0):
        clock.now += cooldown / 2  # the previous cool-down has elapsed: probe, and it fails
        b.failed(DOWN, probe=b.before_call())
        clock.now += cooldown - 0.01
        with pytest.raises(BackendUnavailable):
            b.before_call()
        clock.now += 0.01
    b.before_call()
    b.succeeded()
    assert b.state is State.CLOSED


def test_cancelled_probe_frees_the_slot() -> None:
    clock = Clock()
    b = opened(clock)
    clock.now += 1.0
    b.failed(RuntimeError("cancelled"), probe=b.before_call())
    assert b.before_call()  # another probe may go
