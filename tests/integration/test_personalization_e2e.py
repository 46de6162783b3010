"""Personalisation end to end: `python -m ranker serve` with each profile store (embedded sqlite, real Redis),
RecordEvents -> Rank -> restart -> ForgetUser through the real gRPC server and a real tritonserver."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ranker.tritonserver import LocalTritonServer
from ranker.v1 import ranker_pb2, ranker_pb2_grpc
from tests.integration.conftest import RankerProcess
from tests.redis_server import RedisServer, redis_binary

pytestmark = [pytest.mark.triton, pytest.mark.slow]

APPLIED = ranker_pb2.PERSONALIZATION_APPLIED
COLD_START = ranker_pb2.PERSONALIZATION_COLD_START
UNAVAILABLE = ranker_pb2.PERSONALIZATION_UNAVAILABLE


@pytest.fixture(scope="module", params=["embedded", "redis"])
def ranker(
    request: pytest.FixtureRequest,
    example_release: Path,
    triton: LocalTritonServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RankerProcess]:
    env = {"RANKER_STATE_DIR": str(tmp_path_factory.mktemp("state"))}
    if request.param == "redis":
        env["RANKER_PROFILE_STORE"] = request.getfixturevalue("redis_url")
    process = RankerProcess(example_release, triton.grpc_url, tmp_path_factory.mktemp("ranker-logs"), env)
    process.start()
    yield process
    process.stop()


def stub(target: str) -> ranker_pb2_grpc.RankerStub:
    return ranker_pb2_grpc.RankerStub(grpc.insecure_channel(target))


def purchases(user: str, items: list[str], prefix: str = "e") -> ranker_pb2.RecordEventsRequest:
    return ranker_pb2.RecordEventsRequest(
        events=[
            ranker_pb2.Event(event_id=f"{prefix}{i}", user_id=user, item_id=item, type=ranker_pb2.EVENT_TYPE_PURCHASE)
            for i, item in enumerate(items)
        ]
    )


def rank(client: ranker_pb2_grpc.RankerStub, user: str, **kwargs: object) -> ranker_pb2.RankResponse:
    fields: dict[str, object] = {"query": "drill", "top_k": 20, "user_id": user, **kwargs}
    return client.Rank(ranker_pb2.RankRequest(**fields), timeout=30)  # type: ignore[arg-type]


def ids(response: ranker_pb2.RankResponse) -> list[str]:
    return [item.item_id for item in response.items]


def test_events_change_the_users_next_rank(ranker: RankerProcess) -> None:
    client = stub(ranker.target)
    user = f"shopper-{uuid.uuid4().hex}"
    boost = ranker_pb2.BlendOverrides(weights={"personal": 5.0})
    cold = rank(client, user, blend=boost)
    assert cold.personalization == COLD_START and not cold.degraded
    assert "personal" not in {c.name for c in cold.items[0].breakdown}
    bought = ids(cold)[-2:]  # two drills the non-personalised ranking puts last

    reply = client.RecordEvents(purchases(user, bought), timeout=30)
    assert (reply.applied, reply.duplicates, list(reply.rejected)) == (2, 0, [])

    warm = rank(client, user, blend=boost)  # the very next call sees the update
    assert warm.personalization == APPLIED
    assert "profile" in [t.stage for t in warm.timings] and "personal" in [t.stage for t in warm.timings]
    for item in bought:
        assert ids(warm).index(item) < ids(cold).index(item), (item, ids(cold), ids(warm))
    assert not set(bought) & set(ids(rank(client, user, exclude_purchased=True)))
    # Someone else's ranking is untouched.
    assert ids(rank(client, f"other-{uuid.uuid4().hex}", blend=boost)) == ids(cold)

    recommended = rank(client, user, query="", top_k=5, exclude_purchased=True)
    assert recommended.personalization == APPLIED and len(recommended.items) == 5
    assert not set(bought) & set(ids(recommended))


def test_bad_events_are_rejected_one_by_one_and_limits_fail_the_call(ranker: RankerProcess) -> None:
    client = stub(ranker.target)
    user = f"shopper-{uuid.uuid4().hex}"
    item = ids(rank(client, user))[0]
    request = ranker_pb2.RecordEventsRequest(
        events=[
            ranker_pb2.Event(event_id="ok", user_id=user, item_id=item, type=ranker_pb2.EVENT_TYPE_VIEW),
            ranker_pb2.Event(
                event_id="bad-item", user_id=user, item_id="no-such-item", type=ranker_pb2.EVENT_TYPE_VIEW
            ),
            ranker_pb2.Event(event_id="no-user", item_id=item, type=ranker_pb2.EVENT_TYPE_CLICK),
        ]
    )
    reply = client.RecordEvents(request, timeout=30)
    assert reply.applied == 1
    assert [(r.index, r.event_id) for r in reply.rejected] == [(1, "bad-item"), (2, "no-user")]
    assert "unknown item" in reply.rejected[0].reason and "user_id" in reply.rejected[1].reason
    assert client.RecordEvents(request, timeout=30).duplicates == 1
    too_many = purchases(user, [item] * 1001)
    with pytest.raises(grpc.RpcError) as caught:
        client.RecordEvents(too_many, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "events: at most 1000 events per request, got 1001" in (caught.value.details() or "")


def test_profiles_survive_a_restart_and_forget_user_removes_them(ranker: RankerProcess) -> None:
    client = stub(ranker.target)
    user = f"shopper-{uuid.uuid4().hex}"
    bought = ids(rank(client, user))[-3:]
    assert client.RecordEvents(purchases(user, bought), timeout=30).applied == 3
    before = rank(client, user)
    assert before.personalization == APPLIED

    ranker.stop()
    ranker.start()
    client = stub(ranker.target)
    after = rank(client, user)
    assert after.personalization == APPLIED and ids(after) == ids(before)
    assert client.RecordEvents(purchases(user, bought), timeout=30).duplicates == 3  # event ids survived too

    assert client.ForgetUser(ranker_pb2.ForgetUserRequest(user_id=user), timeout=30).existed
    assert rank(client, user).personalization == COLD_START
    assert not client.ForgetUser(ranker_pb2.ForgetUserRequest(user_id=user), timeout=30).existed
    assert client.RecordEvents(purchases(user, bought), timeout=30).applied == 3  # nothing of theirs was left
    assert user not in ranker.logs(), "user ids must not appear in the logs"


def test_redis_down_means_unavailable_personalisation_not_a_failed_rank(
    example_release: Path, triton: LocalTritonServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    binary = redis_binary()
    assert binary is not None, "redis-server is not installed (scripts/install-redis.sh)"
    redis = RedisServer(tmp_path_factory.mktemp("redis-down"), binary)
    redis.start()
    env = {"RANKER_STATE_DIR": str(tmp_path_factory.mktemp("state")), "RANKER_PROFILE_STORE": redis.url}
    process = RankerProcess(example_release, triton.grpc_url, tmp_path_factory.mktemp("ranker-logs"), env)
    process.start()
    try:
        client = stub(process.target)
        user = f"shopper-{uuid.uuid4().hex}"
        assert client.RecordEvents(purchases(user, ids(rank(client, user))[:2]), timeout=30).applied == 2
        assert rank(client, user).personalization == APPLIED
        redis.stop()
        down = rank(client, user)
        assert down.personalization == UNAVAILABLE and len(down.items) == 20 and not down.degraded
        hiding = rank(client, user, exclude_purchased=True)  # the purchases are unknown: it cannot hide them
        assert hiding.degraded and hiding.degraded_reason == "profile unavailable: exclude_purchased not applied"
        with pytest.raises(grpc.RpcError) as caught:
            client.RecordEvents(purchases(user, ids(down)[:1], prefix="x"), timeout=30)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        process.stop()
        redis.stop()


def test_a_release_exported_with_interactions_ships_neighbours(tmp_path: Path) -> None:
    import polars as pl

    from ranker.release import Release
    from tests.integration.conftest import EXAMPLES, export_release

    items = pl.read_csv(EXAMPLES / "catalog.csv", infer_schema_length=0)["item_id"].to_list()[:40]
    rows = [(f"u{u}", items[(u + step) % 40], step) for u in range(30) for step in range(4)]
    interactions = tmp_path / "interactions.csv"
    pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(interactions)
    out = export_release(tmp_path / "release", "--limit", "40", "--interactions", str(interactions))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["personalization"]["neighbours"]["interactions_in_catalog"] == 120
    assert "neighbours.npz" in manifest["files"]
    release = Release.load(out)
    assert release.neighbours is not None and release.neighbours.num_items == 40
    first = release.catalog.row_of[items[0]]
    assert (
        release.catalog.row_of[items[1]]
        in release.neighbours.indices[release.neighbours.indptr[first] : release.neighbours.indptr[first + 1]]
    )
