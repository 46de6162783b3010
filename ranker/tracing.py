"""Optional OpenTelemetry tracing: a span per Rank, a child span per pipeline stage, and the trace
carried into Triton.

Off unless RANKER_OTEL_EXPORTER is `otlp` (to RANKER_OTEL_ENDPOINT, an OpenTelemetry collector's
gRPC port) or `console` (spans as JSON on stdout, for a look without a collector). Off, every call
here goes to OpenTelemetry's no-op tracer.

- The Rank span continues the caller's trace when the request carries W3C `traceparent` metadata.
- Each Triton inference gets the current `traceparent` as a request header. A Triton started with
  `--trace-config mode=opentelemetry` (docs/operations.md) records its own spans, queue and
  compute, in the same trace.
- RANKER_OTEL_SAMPLE_RATIO samples new traces (parent-based: a sampled caller is always followed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

log = logging.getLogger(__name__)

tracer = trace.get_tracer("ranker")
_enabled = False  # set by configure(); off, span() and outgoing() do nothing (not even no-op spans)

Attributes = Mapping[str, str | int | float | bool]


def configure(exporter: str, *, endpoint: str | None, sample_ratio: float, service_name: str) -> TracerProvider | None:
    """Install the global tracer provider for `exporter` ("none", "otlp" or "console"); None when off."""
    if exporter == "none":
        return None
    span_exporter: SpanExporter
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    elif exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        raise ValueError(f"unknown tracing exporter {exporter!r}: none, otlp or console")
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    global _enabled
    _enabled = True
    log.info("tracing: %s exporter%s, sample ratio %g", exporter, f" to {endpoint}" if endpoint else "", sample_ratio)
    return provider


def incoming(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The caller's trace context from gRPC invocation metadata (W3C traceparent/tracestate)."""
    carrier = {key.lower(): value for key, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)


def enabled() -> bool:
    return _enabled


@contextmanager
def span(name: str, *, context: Context | None = None, attributes: Attributes | None = None) -> Iterator[None]:
    """A span around the block, child of `context` or of the current span."""
    if not _enabled:
        yield
        return
    with tracer.start_as_current_span(name, context=context, attributes=attributes):
        yield


def outgoing() -> dict[str, str]:
    """Headers carrying the current span to a downstream call ({} when not tracing)."""
    headers: dict[str, str] = {}
    if _enabled:
        propagate.inject(headers)
    return headers
