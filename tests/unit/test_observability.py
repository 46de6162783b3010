"""Metrics registry contents, degraded-reason codes, the Triton hook, the log formatters, and the RPC
interceptor (request ids, access logs without raw user ids, INTERNAL for surprises) through the wire."""

from __future__ import annotations

import io
import json
import logging
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ranker.errors import BackendFailed, BackendTimeout, BackendUnavailable
from ranker.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, TextFormatter, configure_logging
from ranker.observability import (
    METRICS,
    Metrics,
    ObservabilityInterceptor,
    degraded_reason_codes,
    serve_metrics,
    triton_call,
)
from ranker.privacy import user_ref
from ranker.security import AuthInterceptor, Tokens
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.unit.inprocess import RANK_TIMINGS, running_server

RANK = "/ranker.v1.Ranker/Rank"


def fresh() -> Metrics:
    return Metrics(CollectorRegistry(), process=False)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# --- degraded reasons ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "codes"),
    [
        ("", []),
        ("text_encoder timeout (BackendTimeout): lexical retrieval only", ["text_encoder_timeout"]),
        ("text_encoder unavailable (BackendUnavailable): lexical retrieval only", ["text_encoder_unavailable"]),
        ("ranker failed (BackendFailed): retrieval order", ["ranker_failed"]),
        ("ranker unavailable, circuit open (CircuitOpen): retrieval order", ["ranker_circuit_open"]),
        (
            "text_encoder unavailable (BackendUnavailable): lexical retrieval only; ranker unavailable (X): retrieval",
            ["text_encoder_unavailable", "ranker_unavailable"],
        ),
        ("profile store unavailable: not personalised", ["profile_unavailable"]),
        ("the moon is in the wrong phase", ["other"]),
    ],
)
def test_degraded_reasons_become_short_bounded_codes(reason: str, codes: list[str]) -> None:
    assert degraded_reason_codes(reason) == codes


# --- the registry ----------------------------------------------------------------------------------


def test_rank_metrics_from_a_result() -> None:
    metrics = fresh()
    metrics.observe_rank([("encode", 4.0), ("score", 12.0)], candidates=300, degraded=False, degraded_reason="")
    metrics.observe_rank(
        [("encode", 1.0)], candidates=50, degraded=True, degraded_reason="ranker unavailable (X): retrieval order"
    )
    assert value(metrics, "ranker_rank_stage_duration_seconds_count", stage="encode") == 2
    assert value(metrics, "ranker_rank_stage_duration_seconds_sum", stage="score") == pytest.approx(0.012)
    assert value(metrics, "ranker_rank_stage_duration_seconds_bucket", stage="score", le="0.025") == 1
    assert value(metrics, "ranker_rank_candidates_count") == 2
    assert value(metrics, "ranker_rank_candidates_bucket", le="100.0") == 1
    assert value(metrics, "ranker_rank_degraded_total", reason="ranker_unavailable") == 1


def test_release_info_names_the_release_and_model_versions_and_follows_a_swap() -> None:
    metrics = fresh()
    metrics.set_release("r-1", {"text_encoder": "1", "ranker": "3"})
    labels = {"release_id": "r-1", "text_encoder_version": "1", "ranker_version": "3"}
    assert value(metrics, "ranker_release_info", **labels) == 1
    metrics.set_release("r-2", {"text_encoder": "2", "ranker": "3", "odd-name.x": "7"})
    exposition = generate_latest(metrics.registry).decode()
    assert 'release_id="r-1"' not in exposition
    assert value(metrics, "ranker_release_info", release_id="r-2", text_encoder_version="2", ranker_version="3",
                 odd_name_x_version="7") == 1  # fmt: skip
    assert metrics.release_id == "r-2"


def test_triton_calls_are_timed_and_errors_counted_by_model_and_kind() -> None:
    metrics = fresh()
    metrics.observe_triton("ranker", 0.004, None)
    metrics.observe_triton("ranker", 0.5, BackendTimeout("triton:ranker", "late"))
    metrics.observe_triton("text_encoder", 0.001, BackendUnavailable("triton:text_encoder", "down"))
    metrics.observe_triton("text_encoder", 0.001, BackendFailed("triton:text_encoder", "bad"))
    assert value(metrics, "ranker_triton_request_duration_seconds_count", model="ranker") == 2
    assert value(metrics, "ranker_triton_errors_total", model="ranker", error="timeout") == 1
    assert value(metrics, "ranker_triton_errors_total", model="text_encoder", error="unavailable") == 1
    assert value(metrics, "ranker_triton_errors_total", model="text_encoder", error="failed") == 1
    assert value(metrics, "ranker_triton_errors_total", model="ranker", error="unavailable") == 0


def test_the_triton_hook_records_into_the_process_metrics() -> None:
    before = value(METRICS, "ranker_triton_request_duration_seconds_count", model="hook-test")
    with triton_call("hook-test"):
        pass
    with pytest.raises(BackendTimeout), triton_call("hook-test"):
        raise BackendTimeout("triton:hook-test", "late")
    assert value(METRICS, "ranker_triton_request_duration_seconds_count", model="hook-test") == before + 2
    assert value(METRICS, "ranker_triton_errors_total", model="hook-test", error="timeout") >= 1


def test_process_metrics_and_the_http_endpoint() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.set_release("r-9", {"ranker": "1"})
    assert serve_metrics(0, "127.0.0.1", metrics) is None
    server = serve_metrics(_free_port(), "127.0.0.1", metrics)
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
    finally:
        server.stop()
    assert 'ranker_release_info{ranker_version="1",release_id="r-9"} 1.0' in body
    assert "process_cpu_seconds_total" in body or "python_gc_objects_collected_total" in body


def test_a_shared_metrics_port_takes_a_second_server_and_a_plain_one_does_not() -> None:
    """Workers of RANKER_WORKERS share their metrics port with their replacement during a roll; a single ranker
    keeps "address in use" for a port someone else has."""
    old, new = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    old.set_release("r-old", {})
    new.set_release("r-new", {})
    port = _free_port()
    first = serve_metrics(port, "127.0.0.1", old, share_port=True)
    assert first is not None
    with pytest.raises(OSError):
        serve_metrics(port, "127.0.0.1", new)
    second = serve_metrics(port, "127.0.0.1", new, share_port=True)
    first.stop()
    assert second is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert 'release_id="r-new"' in reply.read().decode()  # the replacement answers alone
    finally:
        second.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- log formatters --------------------------------------------------------------------------------


def _record(msg: str = "hello %s", args: Any = ("world",), **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("ranker.test", logging.WARNING, __file__, 1, msg, args, None)
    for key, val in extra.items():
        setattr(record, key, val)
    return record


def test_json_lines_have_the_standard_fields_extras_and_the_request_id() -> None:
    outside = json.loads(JsonFormatter().format(_record()))
    assert set(outside) == {"ts", "level", "logger", "msg"}
    assert outside["msg"] == "hello world" and outside["level"] == "WARNING" and outside["logger"] == "ranker.test"
    assert outside["ts"].endswith("Z") and "T" in outside["ts"]

    token = REQUEST_ID.set("req-7")
    try:
        line = JsonFormatter().format(_record(method="/x", ms=1.5, level="shadowed"))
    finally:
        REQUEST_ID.reset(token)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["request_id"] == "req-7" and entry["method"] == "/x" and entry["ms"] == 1.5
    assert entry["level"] == "WARNING" and entry["extra_level"] == "shadowed"


def test_json_lines_carry_the_traceback_in_one_field() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys

        record = logging.LogRecord("ranker", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: bad" in json.loads(line)["exc"]


def test_text_lines_show_the_request_id_and_extras() -> None:
    token = REQUEST_ID.set("req-8")
    try:
        line = TextFormatter().format(_record(code="OK"))
    finally:
        REQUEST_ID.reset(token)
    assert " WARNING ranker.test [req-8]: hello world code=OK" in line
    assert "[" not in TextFormatter().format(_record())


def test_configured_fields_are_on_every_line_in_both_formats() -> None:
    """A worker of RANKER_WORKERS stamps its index on each line; a field the call passes itself wins."""
    root = logging.getLogger()
    for fmt in ("json", "text"):
        stream = io.StringIO()
        handlers, level = list(root.handlers), root.level
        configure_logging("INFO", fmt, stream, fields={"worker": 1})
        try:
            logging.getLogger("ranker.test").info("hello")
            logging.getLogger("ranker.test").info("mine", extra={"worker": 7})
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        first, second = stream.getvalue().splitlines()
        if fmt == "json":
            assert (json.loads(first)["worker"], json.loads(second)["worker"]) == (1, 7)
        else:
            assert first.endswith("hello worker=1") and second.endswith("mine worker=7")


# --- the interceptor through the wire -------------------------------------------------------------


@pytest.fixture()
def captured() -> Iterator[io.StringIO]:
    """JSON log lines of everything logged while the test runs, as the service would write them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


def test_rank_is_counted_timed_and_logged_with_its_request_id_and_hashed_user(captured: io.StringIO) -> None:
    metrics = fresh()
    with running_server([ObservabilityInterceptor(metrics)]) as target, grpc.insecure_channel(target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        named = stub.Rank(ranker_pb2.RankRequest(request_id="req-1", query="drill", user_id="alice@example.com"))
        generated = stub.Rank(ranker_pb2.RankRequest(query="degraded"))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Rank(ranker_pb2.RankRequest(query="invalid"))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert named.request_id == "req-1"
    assert len(generated.request_id) == 32, "an empty request_id is generated once, and echoed"

    assert value(metrics, "ranker_rpcs_total", method=RANK, code="OK") == 2
    assert value(metrics, "ranker_rpcs_total", method=RANK, code="INVALID_ARGUMENT") == 1
    assert value(metrics, "ranker_rpc_duration_seconds_count", method=RANK) == 3
    for stage, _ in RANK_TIMINGS:
        assert value(metrics, "ranker_rank_stage_duration_seconds_count", stage=stage) == 2
    assert value(metrics, "ranker_rank_candidates_sum") == 84
    assert value(metrics, "ranker_rank_degraded_total", reason="text_encoder_timeout") == 1
    assert value(metrics, "ranker_release_info", release_id="rel-1", text_encoder_version="1", ranker_version="2") == 1

    access = [entry for entry in lines(captured) if entry["logger"] == "ranker.access"]
    assert [entry["request_id"] for entry in access[:2]] == ["req-1", generated.request_id]
    assert access[0]["user"] == user_ref("alice@example.com") and access[0]["code"] == "OK"
    assert access[0]["method"] == RANK and access[0]["candidates"] == 42
    assert access[1]["degraded"] == "text_encoder_timeout"
    assert access[2]["code"] == "INVALID_ARGUMENT"
    assert "alice" not in captured.getvalue()


def test_an_unexpected_exception_is_internal_without_its_text(captured: io.StringIO) -> None:
    metrics = fresh()
    with running_server([ObservabilityInterceptor(metrics)]) as target, grpc.insecure_channel(target) as channel:
        stub = ranker_pb2_grpc.RankerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Rank(ranker_pb2.RankRequest(request_id="req-boom", query="boom"))
        assert caught.value.code() is grpc.StatusCode.INTERNAL
        assert caught.value.details() == "internal error"
        with pytest.raises(grpc.RpcError) as unimplemented:
            stub.DeleteItems(ranker_pb2.DeleteItemsRequest(item_ids=["a"]))
        assert unimplemented.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert unimplemented.value.details() == "Method not implemented!"
    assert value(metrics, "ranker_rpcs_total", method=RANK, code="INTERNAL") == 1
    assert value(metrics, "ranker_rpcs_total", method="/ranker.v1.Ranker/DeleteItems", code="UNIMPLEMENTED") == 1
    failures = [entry for entry in lines(captured) if "exc" in entry]
    assert len(failures) == 1, "UNIMPLEMENTED is an answer, not a failure to log"
    assert failures[0]["request_id"] == "req-boom" and "secret internals" in failures[0]["exc"]


def test_rejected_calls_are_counted_and_health_checks_are_not_access_logged(captured: io.StringIO) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    metrics = fresh()
    chain = [ObservabilityInterceptor(metrics), AuthInterceptor(Tokens(inline=["a-token-0123456789abcdef"]))]
    with running_server(chain) as target, grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError):
            ranker_pb2_grpc.RankerStub(channel).ForgetUser(ranker_pb2.ForgetUserRequest(user_id="bob-the-shopper"))
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    forget = "/ranker.v1.Ranker/ForgetUser"
    assert value(metrics, "ranker_rpcs_total", method=forget, code="UNAUTHENTICATED") == 1
    assert value(metrics, "ranker_rpcs_total", method="/grpc.health.v1.Health/Check", code="OK") == 1
    access = [entry for entry in lines(captured) if entry["logger"] == "ranker.access"]
    assert [entry["method"] for entry in access] == [forget]
    assert "bob-the-shopper" not in captured.getvalue()


def test_method_labels_are_bounded_to_known_rpcs() -> None:
    metrics = fresh()
    chain = [ObservabilityInterceptor(metrics), AuthInterceptor(Tokens(inline=["a-token-0123456789abcdef"]))]
    with running_server(chain) as target, grpc.insecure_channel(target) as channel:
        for i in range(3):
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(f"/ranker.v1.Ranker/Probe{i}")(b"", timeout=10)
    assert value(metrics, "ranker_rpcs_total", method="other", code="UNAUTHENTICATED") == 3
    assert "Probe" not in generate_latest(metrics.registry).decode()


def test_a_request_id_cannot_forge_a_log_line() -> None:
    from ranker.observability import _request_id

    request = ranker_pb2.RankRequest(request_id="r1\nranker.access LoadRelease code=OK")
    assert _request_id(request, ()) == "r1\ufffdranker.access LoadRelease code=OK"
    assert _request_id(ranker_pb2.RankRequest(), (("x-request-id", "h\r1"),)) == "h\ufffd1"
