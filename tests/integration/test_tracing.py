"""OpenTelemetry through the real server: a caller's traceparent continues into Rank's spans."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from ranker.tritonserver import LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.integration.conftest import RankerProcess
from tests.unit.fakes import SEARCH_STAGES

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


def console_spans(text: str) -> list[dict[str, object]]:
    """The JSON objects ConsoleSpanExporter printed among the log lines."""
    spans, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth, start = depth + 1, (i if depth == 0 else start)
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                try:
                    value = json.loads(text[start : i + 1])
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict) and "context" in value:
                    spans.append(value)
    return spans


@pytest.mark.triton
def test_rank_spans_continue_the_callers_trace(
    example_release: Path, triton: LocalTritonServer, tmp_path: Path
) -> None:
    process = RankerProcess(
        example_release, triton.grpc_url, tmp_path, env={"RANKER_OTEL_EXPORTER": "console", "RANKER_LOG_FORMAT": "json"}
    )
    with process as target, grpc.insecure_channel(target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        traced = [("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01")]
        response = stub.Rank(ranker_pb2.RankRequest(query="cordless drill", top_k=5), metadata=traced, timeout=10)
        assert len(response.items) == 5 and not response.degraded
        stub.Rank(ranker_pb2.RankRequest(query="paint", top_k=5), timeout=10)  # a trace of its own
    spans = console_spans(process.logs())  # stop() flushed the exporter
    ours = [s for s in spans if s["context"]["trace_id"] == f"0x{TRACE_ID}"]  # type: ignore[index]
    by_name = {s["name"]: s for s in ours}
    assert {"Rank", *SEARCH_STAGES} <= set(by_name)
    rank = by_name["Rank"]
    assert rank["parent_id"] == f"0x{CALLER_SPAN}"
    assert by_name["score"]["parent_id"] == rank["context"]["span_id"]  # type: ignore[index]
    assert rank["resource"]["attributes"]["service.name"] == "ranker"  # type: ignore[index]
    # The untraced request got a new trace (sample ratio 1) with the same stages.
    others = {s["context"]["trace_id"] for s in spans if s["name"] == "Rank"} - {f"0x{TRACE_ID}"}  # type: ignore[index]
    assert len(others) == 1
