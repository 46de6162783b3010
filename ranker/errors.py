"""The service's one exception tree and the table mapping each exception to a gRPC status.

RankerError
├── InvalidArgument        bad input; the message names the field, the value and the limit
├── NotFound               a named thing (release, item) does not exist
├── Overloaded             the service sheds load rather than queue without bound
├── NotConfigured          the server is not set up for this call (e.g. catalog updates without a state folder)
├── Busy                   an operation that must not overlap is already running (e.g. a release load)
└── BackendError           a dependency failed; Rank degrades instead of surfacing these
    ├── BackendUnavailable the dependency cannot be reached or is not ready
    ├── BackendTimeout     the dependency did not answer within the deadline
    └── BackendFailed      the dependency answered with an error
        └── BackendRefused the dependency refused our credentials (a setting to fix)
"""

from __future__ import annotations

import grpc

# The longest INVALID_ARGUMENT message: each one names the field, the value and the limit, and a value is shown
# in its first 64 characters, so only a bug comes near this.
MAX_MESSAGE_CHARS = 2000


class RankerError(Exception):
    """Base of every error the service raises on purpose."""


class InvalidArgument(RankerError):
    """A request field is out of its domain."""

    def __init__(self, field: str, message: str) -> None:
        text = f"{field}: {message}" if field else message
        if len(text) > MAX_MESSAGE_CHARS:  # the status travels in a trailer, and gRPC refuses one over 16 KiB
            text = text[: MAX_MESSAGE_CHARS - 20] + f"… ({len(text)} chars)"
        super().__init__(text)
        self.field = field


class NotFound(RankerError):
    """A named release, model or item does not exist."""


class Overloaded(RankerError):
    """Too many requests in flight; the caller should back off and retry."""


class NotConfigured(RankerError):
    """The call needs something this server was not given (a setting, a writable folder)."""


class Busy(RankerError):
    """Another call of an operation that runs one at a time is in progress; retry once it is done."""


class BackendError(RankerError):
    """A dependency (Triton, the profile store) failed."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend}: {message}")
        self.backend = backend


class BackendUnavailable(BackendError):
    """The dependency cannot be reached or reports not ready."""


class CircuitOpen(BackendUnavailable):
    """The circuit breaker (ranker.breaker) refused the call without sending it."""


class BackendTimeout(BackendError):
    """The dependency did not answer in time."""


class BackendFailed(BackendError):
    """The dependency answered with an error."""


class BackendRefused(BackendFailed):
    """The dependency refused this server's credentials: a setting to fix, not a fault that passes."""


STATUS_CODES: dict[type[RankerError], grpc.StatusCode] = {
    RankerError: grpc.StatusCode.INTERNAL,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotConfigured: grpc.StatusCode.FAILED_PRECONDITION,
    Busy: grpc.StatusCode.ABORTED,
    BackendError: grpc.StatusCode.UNAVAILABLE,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    CircuitOpen: grpc.StatusCode.UNAVAILABLE,
    BackendTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    BackendFailed: grpc.StatusCode.UNAVAILABLE,
    BackendRefused: grpc.StatusCode.UNAVAILABLE,
}


def status_for(cls: type[RankerError]) -> grpc.StatusCode:
    """The gRPC status of an error class: the entry of its nearest ancestor in STATUS_CODES."""
    for ancestor in cls.__mro__:
        if ancestor in STATUS_CODES:
            return STATUS_CODES[ancestor]
    return grpc.StatusCode.INTERNAL


def status_code(error: RankerError) -> grpc.StatusCode:
    return status_for(type(error))
