"""Bytes that are not the request message (what a hostile client sends) are INVALID_ARGUMENT, never UNKNOWN.

Without the interceptor grpc answers UNKNOWN with "Unexpected <class 'DecodeError'>: ..."."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry

from ranker.observability import Metrics, ObservabilityInterceptor
from ranker.security import AuthInterceptor, Tokens
from ranker.v1 import ranker_pb2
from tests.unit.inprocess import running_server

CASES = {
    "not UTF-8 in a string": ("/ranker.v1.Ranker/Rank", b"\x12\x02\xff\xfe", "ranker.v1.RankRequest"),
    "an encoded surrogate": ("/ranker.v1.Ranker/ForgetUser", b"\x0a\x03\xed\xa0\x80", "ranker.v1.ForgetUserRequest"),
    "a length beyond the end": ("/ranker.v1.Ranker/RecordEvents", b"\x0a\x05ab", "ranker.v1.RecordEventsRequest"),
    "garbage": ("/ranker.v1.RankerAdmin/LoadRelease", b"\xff\xff\xff", "ranker.v1.LoadReleaseRequest"),
    "health check": ("/grpc.health.v1.Health/Check", b"\x0a\x01\x80", "grpc.health.v1.HealthCheckRequest"),
}


def raw_call(channel: grpc.Channel, path: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)(
        payload, timeout=10, metadata=metadata
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_unparseable_request_is_invalid_argument_naming_the_message(case: str) -> None:
    path, payload, message_type = CASES[case]
    metrics = Metrics(CollectorRegistry(), process=False)
    with running_server([ObservabilityInterceptor(metrics)]) as target, grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(channel, path, payload)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert caught.value.details().startswith(f"request: not a valid {message_type}")
        assert "DecodeError" not in caught.value.details()
        # The same method still answers a well-formed request.
        raw_call(channel, "/ranker.v1.Ranker/Rank", ranker_pb2.RankRequest(query="drill").SerializeToString())
    samples = metrics.registry.get_sample_value("ranker_rpcs_total", {"method": path, "code": "INVALID_ARGUMENT"})
    assert samples == 1


def test_authentication_comes_before_parsing() -> None:
    chain = [
        ObservabilityInterceptor(Metrics(CollectorRegistry(), process=False)),
        AuthInterceptor(Tokens(inline=["t0k"])),
    ]
    with running_server(chain) as target, grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(channel, "/ranker.v1.Ranker/ForgetUser", b"\x0a\x01\x80")
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(channel, "/ranker.v1.Ranker/ForgetUser", b"\x0a\x01\x80", (("authorization", "Bearer t0k"),))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
