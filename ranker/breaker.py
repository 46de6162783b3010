"""A circuit breaker per backend: stop calling a dead dependency, probe it, and close again by itself.

closed ──(`failures` consecutive failures)──▶ open ──(cool-down elapsed)──▶ half-open
  ▲                                            ▲                             │ one probe call at a time
  └──────────────(probe succeeds)──────────────┴─────(probe fails: longer cool-down)

While open, calls fail at once (BackendUnavailable "circuit open") instead of each waiting for a
timeout, so a Rank degrades in microseconds rather than after `triton_timeout_s`. The cool-down
doubles after each failed probe up to `max_cooldown_s`, and resets when a probe succeeds.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from ranker.errors import BackendTimeout, BackendUnavailable, CircuitOpen

# A timeout counts as "too slow" only when the call had at least this long: a caller whose deadline left
# a few milliseconds says nothing about the backend, and must not open the circuit for every other caller.
MIN_COUNTED_TIMEOUT_S = 0.02


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures of one backend; not thread-safe (one asyncio loop owns it)."""

    def __init__(
        self,
        backend: str,
        *,
        failures: int = 3,
        cooldown_s: float = 0.5,
        max_cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.failures = failures
        self.base_cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self._clock = clock
        self._consecutive = 0
        self._cooldown_s = cooldown_s
        self._opened_at = 0.0
        self._probing = False
        self.state = State.CLOSED

    def before_call(self) -> bool:
        """Raise CircuitOpen when the call must not go out; otherwise let it through. True when the call is
        the half-open probe: only its own outcome (`probe=True`) decides the half-open state."""
        if self.state is State.CLOSED:
            return False
        if self.state is State.OPEN:
            if self._clock() - self._opened_at < self._cooldown_s:
                raise CircuitOpen(self.backend, "circuit open after repeated failures")
            self.state = State.HALF_OPEN
        if self._probing:  # half-open: one probe at a time, the rest fail fast
            raise CircuitOpen(self.backend, "circuit half-open, probe in flight")
        self._probing = True
        return True

    def succeeded(self) -> None:
        """Any answer closes the circuit: the backend is up."""
        self._consecutive = 0
        self._probing = False
        self._cooldown_s = self.base_cooldown_s
        self.state = State.CLOSED

    def failed(self, error: BaseException, *, probe: bool = False, timeout: float | None = None) -> None:
        """Count a failure of a call that had `timeout` seconds. Only "unreachable" and "too slow" count: an
        error answer (BackendFailed), a cancelled call or a timeout shorter than MIN_COUNTED_TIMEOUT_S says
        nothing about whether the backend can take more calls. A call sent before the circuit opened that
        fails while it is half-open does not end the probe's turn."""
        if probe:
            self._probing = False
        if not isinstance(error, BackendUnavailable | BackendTimeout):
            return
        if isinstance(error, BackendTimeout) and timeout is not None and timeout < MIN_COUNTED_TIMEOUT_S:
            return
        self._consecutive += 1
        if self.state is State.HALF_OPEN:
            if probe:
                self._cooldown_s = min(self._cooldown_s * 2, self.max_cooldown_s)
                self._open()
        elif self._consecutive >= self.failures:
            self._open()

    def _open(self) -> None:
        self.state = State.OPEN
        self._opened_at = self._clock()
        self._probing = False
