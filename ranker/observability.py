"""Prometheus metrics and the RPC interceptor that records them, stamps request ids and writes access logs.

Every metric lives on `Metrics`; the process-wide instance is METRICS, served on RANKER_METRICS_PORT.
Label values are bounded: RPC methods are the registered ones, stages and models come from the code
and the release, degraded reasons are short codes (`degraded_reason_codes`), never free text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    gc_collector,
    make_wsgi_app,
    platform_collector,
    process_collector,
    start_http_server,
)
from prometheus_client.exposition import ThreadingWSGIServer

from ranker.errors import BackendFailed, BackendTimeout, BackendUnavailable
from ranker.logs import REQUEST_ID
from ranker.privacy import user_ref
from ranker.v1 import ranker_pb2

log = logging.getLogger(__name__)
access_log = logging.getLogger("ranker.access")

RANK_METHOD = "/ranker.v1.Ranker/Rank"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
OTHER_METHOD = "other"
MAX_REQUEST_ID_CHARS = 256

_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_CANDIDATE_BUCKETS = (0, 10, 25, 50, 100, 200, 400, 600, 800, 1000, 1600, 3200, 8000)
_LABEL_NAME = re.compile(r"[^a-zA-Z0-9_]")

# Degraded-reason codes: "<component>_<kind>", both from fixed sets.
_COMPONENTS = (
    ("text_encoder", "text_encoder"),
    ("encoder", "text_encoder"),
    ("ranker", "ranker"),
    ("vector_engine", "vector_engine"),
)
_PROFILE_WORDS = ("profile", "personal")


def degraded_reason_codes(reason: str) -> list[str]:
    """Short, bounded codes for a RankResult.degraded_reason ("; "-joined free text), e.g.
    ["text_encoder_timeout"]. Unknown text maps to "other" so the label set stays finite."""
    codes: list[str] = []
    for part in (p.strip().lower() for p in reason.split(";")):
        if not part:
            continue
        component = next((name for prefix, name in _COMPONENTS if part.startswith(prefix)), None)
        if component is None and any(word in part for word in _PROFILE_WORDS):
            component = "profile"
        if component is None:
            codes.append("other")
            continue
        if "circuit" in part:
            kind = "circuit_open"
        elif "timeout" in part or "deadline" in part:
            kind = "timeout"
        elif "unavailable" in part:
            kind = "unavailable"
        else:
            kind = "failed"
        codes.append(f"{component}_{kind}")
    return codes


def triton_error_kind(error: BaseException | None) -> str | None:
    """The `error` label of a failed Triton call (None for success)."""
    if error is None:
        return None
    if isinstance(error, BackendTimeout | TimeoutError):
        return "timeout"
    if isinstance(error, BackendUnavailable):
        return "unavailable"
    if isinstance(error, BackendFailed):
        return "failed"
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"
    return "other"


class Metrics:
    """The service's Prometheus metrics on one registry (a fresh registry per instance, for tests)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        if process:
            process_collector.ProcessCollector(registry=self.registry)
            platform_collector.PlatformCollector(registry=self.registry)
            gc_collector.GCCollector(registry=self.registry)
        r = self.registry
        self.rpcs = Counter(
            "ranker_rpcs", "Finished RPCs by full method name and gRPC status code", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "ranker_rpc_duration_seconds",
            "RPC handling time in the server",
            ["method"],
            buckets=_RPC_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "ranker_rank_stage_duration_seconds",
            "Wall time of each Rank pipeline stage (RankResponse.timings)",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.candidates = Histogram(
            "ranker_rank_candidates", "Candidates that reached scoring per Rank", buckets=_CANDIDATE_BUCKETS, registry=r
        )
        self.degraded = Counter(
            "ranker_rank_degraded", "Degraded Rank responses by reason code", ["reason"], registry=r
        )
        self.triton_seconds = Histogram(
            "ranker_triton_request_duration_seconds",
            "Time of each Triton inference call, failed ones included",
            ["model"],
            buckets=_RPC_BUCKETS,
            registry=r,
        )
        self.triton_errors = Counter(
            "ranker_triton_errors", "Failed Triton inference calls by model and kind", ["model", "error"], registry=r
        )
        self.query_cache = Counter(
            "ranker_query_cache_lookups",
            "Query embedding cache lookups (RANKER_QUERY_CACHE_SIZE) by result: hit or miss",
            ["result"],
            registry=r,
        )
        self.catalog_log_lag = Histogram(
            "ranker_catalog_log_lag_seconds",
            "From another replica's append to the shared catalog log (the stream id's time) to its change serving here",
            buckets=_RPC_BUCKETS,
            registry=r,
        )
        self.catalog_log_records = Gauge(
            "ranker_catalog_log_records",
            "Item records in the shared catalog log up to the entry applied here: what a starting replica replays",
            registry=r,
        )
        self.catalog_log_compactions = Counter(
            "ranker_catalog_log_compactions",
            "Compactions of the shared catalog log started here, by result: done, skipped or failed",
            ["result"],
            registry=r,
        )
        self.release = Info("ranker_release", "The serving release and its model versions", registry=r)
        self.release_loaded = Gauge(
            "ranker_release_loaded_timestamp_seconds", "When the serving release was (last) set", registry=r
        )
        self._release_id: str | None = None

    def set_release(self, release_id: str, model_versions: Mapping[str, str]) -> None:
        """Publish the serving release: ranker_release_info{release_id, <model>_version...} 1."""
        labels = {"release_id": release_id}
        for model, version in sorted(model_versions.items()):
            labels[f"{_LABEL_NAME.sub('_', model)}_version"] = str(version)
        self.release.info(labels)
        self.release_loaded.set_to_current_time()
        self._release_id = release_id

    @property
    def release_id(self) -> str | None:
        return self._release_id

    def observe_rpc(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.rpcs.labels(method=method, code=code.name).inc()
        self.rpc_seconds.labels(method=method).observe(seconds)

    def observe_rank(
        self,
        timings_ms: Iterable[tuple[str, float]],
        *,
        candidates: int,
        degraded_reason: str,
        degraded: bool,
    ) -> None:
        """Record one successful Rank: stage timings, candidates and, when degraded, its reason codes."""
        for stage, millis in timings_ms:
            self.stage_seconds.labels(stage=stage).observe(millis / 1000.0)
        self.candidates.observe(candidates)
        if degraded:
            for code in degraded_reason_codes(degraded_reason) or ["other"]:
                self.degraded.labels(reason=code).inc()

    def observe_triton(self, model: str, seconds: float, error: BaseException | None) -> None:
        self.triton_seconds.labels(model=model).observe(seconds)
        kind = triton_error_kind(error)
        if kind is not None:
            self.triton_errors.labels(model=model, error=kind).inc()


METRICS = Metrics()


def observe_query_cache(hit: bool) -> None:
    """The hook ranker.models.CachedEncoder calls once per lookup."""
    METRICS.query_cache.labels(result="hit" if hit else "miss").inc()


def observe_triton(model: str, seconds: float, error: BaseException | None = None) -> None:
    """The hook ranker.triton calls once per inference (success or failure)."""
    METRICS.observe_triton(model, seconds, error)


@contextlib.contextmanager
def triton_call(model: str) -> Iterator[None]:
    """Time the enclosed Triton call and record it with observe_triton (its exception, if any)."""
    start = time.perf_counter()
    try:
        yield
    except BaseException as e:
        observe_triton(model, time.perf_counter() - start, e)
        raise
    observe_triton(model, time.perf_counter() - start, None)


@dataclass
class MetricsServer:
    """The /metrics HTTP endpoint (prometheus_client's threaded WSGI server)."""

    port: int
    _server: Any

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(
    port: int, host: str, metrics: Metrics = METRICS, *, share_port: bool = False
) -> MetricsServer | None:
    """Serve `metrics` on http://host:port/metrics; None when port is 0 (disabled). With `share_port` the port is
    bound with SO_REUSEPORT: a worker of RANKER_WORKERS and its replacement in a roll both hold it for a moment."""
    if port == 0:
        return None
    server: WSGIServer
    if share_port:
        server = _shared_port_server(port, host, metrics.registry)
    else:
        server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    bound = int(server.server_address[1])
    log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(port=bound, _server=server)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per scrape."""


def _shared_port_server(port: int, host: str, registry: CollectorRegistry) -> WSGIServer:
    """prometheus_client's threaded WSGI server for `registry`, bound with SO_REUSEPORT, serving on a daemon thread."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type(
        "SharedPortServer", (ThreadingWSGIServer,), {"address_family": family, "allow_reuse_port": True}
    )
    server: WSGIServer = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


# --- the interceptor -----------------------------------------------------------------------------

Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Deserializer = Callable[[bytes], Any] | None


def around_unary(
    handler: grpc.RpcMethodHandler | None,
    wrap: Callable[[Behavior], Behavior],
    deserializer: Callable[[Deserializer], Deserializer] = lambda d: d,
) -> grpc.RpcMethodHandler | None:
    """`handler` with its unary behaviour replaced by wrap(behaviour) (and its request deserializer by
    deserializer(it)): what a server interceptor returns. Streaming handlers (health Watch, reflection)
    and unknown methods (None) pass through unchanged."""
    if handler is None or handler.unary_unary is None:
        return handler
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary),
        request_deserializer=deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class Unparseable:
    """Stands in for a request whose bytes do not parse (malformed protobuf, a string that is not UTF-8):
    grpc itself would answer UNKNOWN with the decoder's exception text."""

    message_type: str


def tolerant(deserializer: Deserializer) -> Deserializer:
    """The deserializer, returning Unparseable instead of raising on bytes that are not its message."""
    if deserializer is None:
        return None
    message = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(message, "full_name", "the request message")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # the bytes are the client's: whatever the decoder raises, the request is bad
            return Unparseable(name)

    return parse


def _known_methods() -> frozenset[str]:
    methods = {
        f"/{service.full_name}/{method.name}"
        for descriptor in (ranker_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR)
        for service in descriptor.services_by_name.values()
        for method in service.methods
    }
    methods.add(f"/{reflection.SERVICE_NAME}/ServerReflectionInfo")
    return frozenset(methods)


# The `method` label takes these values only: a client can send any path, and a rejected or unknown
# one must not mint a new time series.
KNOWN_METHODS = _known_methods()


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


def _request_id(request: Any, metadata: Any) -> str:
    """The request's own request_id; else the x-request-id header; else a new one, written into an
    empty request_id field so the service, the response and the logs all use the same id."""
    value = getattr(request, "request_id", None)
    if isinstance(value, str) and value:
        return _printable(value[:MAX_REQUEST_ID_CHARS])
    for key, header in metadata or ():
        if key == "x-request-id" and isinstance(header, str) and header:
            generated = _printable(header[:MAX_REQUEST_ID_CHARS])
            break
    else:
        generated = uuid.uuid4().hex
    if isinstance(value, str):  # the message has an empty request_id field: fill it
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            request.request_id = generated
    return generated


def _printable(value: str) -> str:
    """The id as it may appear in a log line: a control character (a newline could forge a line) becomes U+FFFD."""
    return value if value.isprintable() else "".join(c if c.isprintable() else "\ufffd" for c in value)


def _user(request: Any) -> str | None:
    value = getattr(request, "user_id", None)
    return user_ref(value) if isinstance(value, str) and value else None


def _final_code(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else default


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """For every unary RPC: a request id in the logging context, ranker_rpcs_total / duration, Rank's
    stage, candidate and degraded metrics, one access-log line, and INTERNAL (never the exception
    text) for an unexpected exception. Streaming RPCs (health Watch, reflection) pass through."""

    def __init__(self, metrics: Metrics = METRICS, *, access_log: bool = True) -> None:
        self._metrics = metrics
        self._access_log = access_log

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = method_label(handler_call_details.method)
        metadata = handler_call_details.invocation_metadata
        return around_unary(
            await continuation(handler_call_details), lambda inner: self._wrap(method, metadata, inner), tolerant
        )

    def _wrap(self, method: str, metadata: Any, inner: Behavior) -> Behavior:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = REQUEST_ID.set(_request_id(request, metadata))
            start = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            response: Any = None
            try:
                if isinstance(request, Unparseable):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"request: not a valid {request.message_type} (malformed, or a string that is not UTF-8)",
                    )
                response = await inner(request, context)
                code = _final_code(context, grpc.StatusCode.OK)
                return response
            except grpc.aio.AbortError:
                code = _final_code(context, grpc.StatusCode.UNKNOWN)
                raise
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = _final_code(context, grpc.StatusCode.INTERNAL)
                if code is not grpc.StatusCode.INTERNAL:
                    # The handler chose a status before raising (the generated base class does this for
                    # UNIMPLEMENTED): answer with it, without grpc's "unexpected exception" traceback.
                    await context.abort(code, context.details() or "")
                log.exception("%s failed", method)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
                raise AssertionError("unreachable: context.abort raises") from None
            finally:
                seconds = time.perf_counter() - start
                self._record(method, code, seconds, request, response)
                REQUEST_ID.reset(token)

        return behavior

    def _record(self, method: str, code: grpc.StatusCode, seconds: float, request: Any, response: Any) -> None:
        try:
            self._metrics.observe_rpc(method, code, seconds)
            fields: dict[str, Any] = {"method": method, "code": code.name, "ms": round(seconds * 1000.0, 2)}
            user = _user(request)
            if user is not None:
                fields["user"] = user
            if method == RANK_METHOD and code is grpc.StatusCode.OK and response is not None:
                self._observe_rank(response, fields)
            if self._access_log and not method.startswith(HEALTH_PREFIX):
                access_log.info("rpc finished", extra=fields)
        except Exception:  # metrics must never fail a request
            log.exception("recording metrics for %s failed", method)

    def _observe_rank(self, response: Any, fields: dict[str, Any]) -> None:
        timings = [(t.stage, t.millis) for t in response.timings]
        self._metrics.observe_rank(
            timings,
            candidates=response.candidates,
            degraded_reason=response.degraded_reason,
            degraded=response.degraded,
        )
        # A release swap (RankerAdmin.LoadRelease) shows up in the responses; follow it.
        release = response.release
        if release.release_id and release.release_id != self._metrics.release_id:
            self._metrics.set_release(release.release_id, dict(release.model_versions))
        fields["candidates"] = response.candidates
        fields["items"] = len(response.items)
        if response.degraded:
            fields["degraded"] = ",".join(degraded_reason_codes(response.degraded_reason)) or "other"
