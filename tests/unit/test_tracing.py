"""Tracing: the caller's trace continues through Rank's stages and into the Triton request headers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ranker import tracing
from ranker.domain import RankQuery
from tests.unit.fakes import SEARCH_STAGES
from tests.unit.test_pipeline import make_ranker

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "_enabled", True)
    yield exporter
    provider.shutdown()


def test_off_by_default_no_span_and_no_header() -> None:
    assert not tracing.enabled()
    with tracing.span("Rank", context=tracing.incoming([("traceparent", CALLER)])):
        assert tracing.outgoing() == {}
        assert not trace.get_current_span().get_span_context().is_valid


def test_rank_stages_are_children_of_the_callers_trace(spans: InMemorySpanExporter) -> None:
    seen: dict[str, str] = {}

    async def run() -> None:
        with tracing.span("Rank", context=tracing.incoming([("traceparent", CALLER), ("x-other", "1")])):
            seen.update(tracing.outgoing())
            await make_ranker().rank(RankQuery(request_id="r1", query="cordless drill", top_k=3))

    asyncio.run(run())
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert {"Rank", *SEARCH_STAGES} <= set(finished)
    root = finished["Rank"]
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.parent is not None and format(root.parent.span_id, "016x") == "00f067aa0ba902b7"
    for name in ("encode", "score", "diversify"):
        assert finished[name].parent is not None and finished[name].parent.span_id == root.context.span_id
    # What a Triton call made inside the Rank span carries: the same trace, the Rank span as parent.
    assert seen["traceparent"].startswith(f"00-{TRACE_ID}-{root.context.span_id:016x}-")


def test_unknown_exporter_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown tracing exporter"):
        tracing.configure("zipkin", endpoint=None, sample_ratio=1.0, service_name="ranker")
