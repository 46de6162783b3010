"""RecordEvents and ForgetUser at the service: bad events rejected one by one, limits as INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ranker.config import Settings
from ranker.domain import Personalization, RankResult
from ranker.errors import InvalidArgument
from ranker.personal import Personalizer
from ranker.pipeline import PipelineSettings, Ranker
from ranker.profiles import EmbeddedProfileStore
from ranker.service import RankerServicer, to_events, to_query, to_response
from ranker.v1 import ranker_pb2
from tests.unit.fakes import FakeEncoder, FakeScorer, FakeTokenizer, tiny_release

NOW = time.time()


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """The part of grpc.aio.ServicerContext the servicer uses."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None


def stamp(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def make_ranker(tmp_path: Path | None) -> Ranker:
    tokenizer = FakeTokenizer()
    personalizer = None
    if tmp_path is not None:
        store = EmbeddedProfileStore(tmp_path / "p.sqlite3", ttl_s=3600, dedup_ttl_s=3600)
        personalizer = Personalizer(store=store, timeout_s=1.0)
    return Ranker(
        tiny_release(),
        encoder=FakeEncoder(tokenizer.texts),
        scorer=FakeScorer(),
        tokenizer=tokenizer,  # type: ignore[arg-type]
        settings=PipelineSettings(dense_k=8, lexical_k=8),
        personalizer=personalizer,
    )


def ev(**kwargs: Any) -> ranker_pb2.Event:
    fields: dict[str, Any] = {"event_id": "e", "user_id": "u1", "item_id": "d1", "type": ranker_pb2.EVENT_TYPE_CLICK}
    return ranker_pb2.Event(**{**fields, **kwargs})


BAD_EVENTS: dict[str, tuple[ranker_pb2.Event, str]] = {
    "unknown item": (ev(item_id="no-such-item"), "item_id: unknown item 'no-such-item'"),
    "missing user": (ev(user_id=""), "user_id: must not be empty"),
    "missing event id": (ev(event_id=" "), "event_id: must not be empty"),
    "no type": (ev(type=ranker_pb2.EVENT_TYPE_UNSPECIFIED), "type: must be one of VIEW, CLICK"),
    "unknown type": (ev(type=99), "got 99"),
    "no item": (ev(item_id=""), "item_id: required for CLICK events"),
    "far future": (ev(timestamp=stamp(NOW + 86400)), "timestamp: 86400 s in the future"),
    "long user id": (ev(user_id="u" * 300), "user_id: must be at most 256 characters, got 300"),
    "long item id": (ev(item_id="i" * 300), "item_id: must be at most 256 characters, got 300"),
    "long query": (ev(query="q" * 2000), "query: must be at most 1000 characters, got 2000"),
    "search without query": (ev(type=ranker_pb2.EVENT_TYPE_SEARCH, item_id=""), "query: required for SEARCH"),
}


@pytest.mark.parametrize("case", sorted(BAD_EVENTS))
def test_each_bad_event_is_rejected_alone(case: str) -> None:
    bad, reason = BAD_EVENTS[case]
    good = [ev(event_id="g1"), ev(event_id="g2", type=ranker_pb2.EVENT_TYPE_SEARCH, item_id="", query="paint")]
    request = ranker_pb2.RecordEventsRequest(events=[good[0], bad, good[1]])
    events, rejected = to_events(request, make_ranker(None), Settings(), NOW)
    assert [e.event_id for e in events] == ["g1", "g2"]
    assert len(rejected) == 1 and rejected[0].index == 1 and rejected[0].event_id == bad.event_id[:256]
    assert reason in rejected[0].reason


def test_timestamps() -> None:
    request = ranker_pb2.RecordEventsRequest(
        events=[
            ev(event_id="a"),
            ev(event_id="b", timestamp=stamp(NOW - 3600)),
            ev(event_id="c", timestamp=stamp(NOW + 60)),
        ]
    )
    events, rejected = to_events(request, make_ranker(None), Settings(), NOW)
    assert not rejected
    assert [e.timestamp for e in events] == [
        NOW,
        pytest.approx(NOW - 3600, abs=1e-3),
        pytest.approx(NOW + 60, abs=1e-3),
    ]


def test_too_many_events_is_invalid_argument() -> None:
    settings = Settings(max_events_per_request=3)
    request = ranker_pb2.RecordEventsRequest(events=[ev(event_id=str(i)) for i in range(4)])
    with pytest.raises(InvalidArgument, match=r"events: at most 3 events per request, got 4"):
        to_events(request, make_ranker(None), settings, NOW)


def test_record_events_and_forget_user_through_the_servicer(tmp_path: Path) -> None:
    ranker = make_ranker(tmp_path)
    servicer = RankerServicer(lambda: ranker, Settings(max_events_per_request=5))
    context: Any = FakeContext()

    async def scenario() -> None:
        request = ranker_pb2.RecordEventsRequest(
            events=[
                ev(event_id="1", type=ranker_pb2.EVENT_TYPE_PURCHASE),
                ev(event_id="2", item_id="zzz"),
                ev(event_id="1"),
            ]
        )
        reply = await servicer.RecordEvents(request, context)
        assert (reply.applied, reply.duplicates) == (1, 1)
        assert [(r.index, r.event_id) for r in reply.rejected] == [(1, "2")] and "unknown item" in reply.rejected[
            0
        ].reason
        again = await servicer.RecordEvents(request, context)
        assert (again.applied, again.duplicates, len(again.rejected)) == (0, 2, 1)

        rank = await servicer.Rank(ranker_pb2.RankRequest(user_id="u1", top_k=3, exclude_purchased=True), context)
        assert rank.personalization == ranker_pb2.PERSONALIZATION_APPLIED and "d1" not in [
            i.item_id for i in rank.items
        ]

        with pytest.raises(Aborted) as caught:
            await servicer.RecordEvents(
                ranker_pb2.RecordEventsRequest(events=[ev(event_id=str(i)) for i in range(6)]), context
            )
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "events: at most 5 events per request, got 6" in caught.value.details

        assert (await servicer.ForgetUser(ranker_pb2.ForgetUserRequest(user_id="u1"), context)).existed
        assert not (await servicer.ForgetUser(ranker_pb2.ForgetUserRequest(user_id="u1"), context)).existed
        rank = await servicer.Rank(ranker_pb2.RankRequest(user_id="u1", query="drill"), context)
        assert rank.personalization == ranker_pb2.PERSONALIZATION_COLD_START
        with pytest.raises(Aborted) as caught:
            await servicer.ForgetUser(ranker_pb2.ForgetUserRequest(user_id=""), context)
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT and "user_id" in caught.value.details

    asyncio.run(scenario())


def test_without_a_profile_store_the_calls_fail_precondition() -> None:
    ranker = make_ranker(None)
    servicer = RankerServicer(lambda: ranker, Settings())
    context: Any = FakeContext()
    with pytest.raises(Aborted) as caught:
        asyncio.run(servicer.RecordEvents(ranker_pb2.RecordEventsRequest(events=[ev()]), context))
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    response = asyncio.run(servicer.Rank(ranker_pb2.RankRequest(query="drill", user_id="u1"), context))
    assert response.personalization == ranker_pb2.PERSONALIZATION_UNAVAILABLE and response.items


def test_rank_requests_with_users() -> None:
    settings, row_of = Settings(), {"a": 0}
    q = to_query(ranker_pb2.RankRequest(user_id="u1", exclude_purchased=True), settings, row_of)
    assert (q.query, q.user_id, q.exclude_purchased) == ("", "u1", True)  # recommendations
    with pytest.raises(InvalidArgument, match="query: must not be empty when candidate_ids is empty"):
        to_query(ranker_pb2.RankRequest(user_id=" "), settings, row_of)
    assert to_query(ranker_pb2.RankRequest(query="x", user_id=""), settings, row_of).user_id is None
    result = RankResult(
        request_id="r", items=(), release_id="x", model_versions={}, timings_ms=(), candidates=0,
        personalization=Personalization.COLD_START,
    )  # fmt: skip
    assert to_response(result, make_ranker(None)).personalization == ranker_pb2.PERSONALIZATION_COLD_START
