"""User profiles: the decay and weighting math, and both stores behind one contract (Redis is a real server)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from ranker.config import Settings
from ranker.errors import BackendError, BackendRefused
from ranker.events import Event, EventType
from ranker.personal import Personalizer
from ranker.profiles import (
    EmbeddedProfileStore,
    ItemSpace,
    Profile,
    ProfileConfig,
    ProfileStore,
    RedisProfileStore,
    apply_events,
    open_store,
    redacted,
)
from ranker.server import open_personalizer, read_secret
from tests.redis_server import INSTALL_HINT, RedisServer, redis_binary
from tests.unit.fakes import tiny_release

DAY = 86400.0
T0 = 1_700_000_000.0
CONFIG = ProfileConfig(half_life_s=DAY)
ITEMS = ItemSpace.of(tiny_release())


def event(
    item: str, kind: EventType = EventType.PURCHASE, t: float = T0, eid: str | None = None, user: str = "u1"
) -> Event:
    return Event(event_id=eid or f"{user}-{item}-{kind.value}-{t}", user_id=user, item_id=item, type=kind, timestamp=t)


def cosine(profile: Profile, item: str) -> float:
    row = ITEMS.live_row(item)
    assert row is not None
    c = profile.centroid / np.linalg.norm(profile.centroid)
    return float(c @ ITEMS.embeddings[row])


# -- the math ---------------------------------------------------------------------------------------


def test_stronger_event_types_weigh_more() -> None:
    # One view of a paint, one purchase of a drill, at the same time: the profile leans to the drill.
    profile = apply_events(None, [event("p1", EventType.VIEW), event("d1", EventType.PURCHASE)], ITEMS, CONFIG)
    assert cosine(profile, "d1") > cosine(profile, "p1")
    assert profile.brands["DEWALT"] == pytest.approx(8 * profile.brands["Behr"])
    assert profile.categories["power tools"] / profile.weight == pytest.approx(8 / 9)
    weights = {kind: apply_events(None, [event("d1", kind)], ITEMS, CONFIG).weight for kind in EventType}
    assert weights[EventType.PURCHASE] > weights[EventType.ADD_TO_CART] > weights[EventType.CLICK]
    assert weights[EventType.CLICK] > weights[EventType.VIEW] > weights[EventType.SEARCH] == 0.0


def test_weights_halve_every_half_life() -> None:
    profile = apply_events(None, [event("p1", t=T0), event("d1", t=T0 + DAY)], ITEMS, CONFIG)
    assert profile.categories["paint"] == pytest.approx(4.0)  # 8, one half-life old
    assert profile.categories["power tools"] == pytest.approx(8.0)
    assert profile.updated_at == T0 + DAY
    later = apply_events(profile, [event("h1", EventType.VIEW, t=T0 + 3 * DAY)], ITEMS, CONFIG)
    assert later.categories["paint"] == pytest.approx(1.0)
    assert later.weight == pytest.approx(4.0 / 4 + 8.0 / 4 + 1.0)


def test_order_and_batching_do_not_matter() -> None:
    events = [event(item, kind, T0 + i * 3600) for i, (item, kind) in enumerate(
        [("d1", EventType.VIEW), ("b1", EventType.CLICK), ("p2", EventType.ADD_TO_CART), ("d4", EventType.PURCHASE)]
    )]  # fmt: skip
    at_once = apply_events(None, events, ITEMS, CONFIG)
    reversed_batches = None
    for e in reversed(events):
        reversed_batches = apply_events(reversed_batches, [e], ITEMS, CONFIG)
    assert reversed_batches is not None
    assert np.allclose(at_once.centroid, reversed_batches.centroid, rtol=1e-5)
    assert at_once.weight == pytest.approx(reversed_batches.weight)
    assert at_once.recent == reversed_batches.recent
    assert [r.item_id for r in at_once.recent] == ["d4", "p2", "b1", "d1"]  # newest first
    assert at_once.purchased == ("d4",)


def test_recent_and_purchases_are_bounded_and_unique() -> None:
    config = dataclasses.replace(CONFIG, max_recent=3, max_purchased=2, max_affinities=2)
    items = ["d1", "d2", "d3", "d4", "b1", "d1"]
    profile = apply_events(None, [event(i, t=T0 + k) for k, i in enumerate(items)], ITEMS, config)
    assert [r.item_id for r in profile.recent] == ["d1", "b1", "d4"]
    assert profile.purchased == ("d1", "b1")
    assert len(profile.brands) <= 2 and len(profile.categories) <= 2
    assert profile.events == 6


def test_a_late_purchase_takes_its_place_by_time() -> None:
    config = dataclasses.replace(CONFIG, max_purchased=2)
    newest, newer, oldest = event("d1", t=T0 + 200), event("d2", t=T0 + 100), event("p1", t=T0)
    at_once = apply_events(None, [oldest, newer, newest], ITEMS, config)
    late = apply_events(apply_events(None, [newer, newest], ITEMS, config), [oldest], ITEMS, config)
    assert at_once.purchased == late.purchased == ("d1", "d2")  # the late, older one does not push d2 out
    assert late.purchased_at == (T0 + 200, T0 + 100)
    stored = Profile.from_bytes(late.to_bytes())
    assert stored.purchased_at == late.purchased_at


def test_searches_and_deleted_items_count_but_do_not_personalise() -> None:
    search = Event(event_id="s", user_id="u", item_id="", type=EventType.SEARCH, timestamp=T0, query="drill")
    profile = apply_events(None, [search], ITEMS, CONFIG)
    assert profile.events == 1 and profile.is_cold
    gone = dataclasses.replace(ITEMS, live_row=lambda item_id: None)
    assert apply_events(None, [event("d1")], gone, CONFIG).is_cold


def test_serialisation_round_trip() -> None:
    profile = apply_events(None, [event("d1", EventType.CLICK), event("p1", t=T0 + 5)], ITEMS, CONFIG)
    again = Profile.from_bytes(profile.to_bytes())
    assert again == dataclasses.replace(again, centroid=again.centroid)
    assert np.array_equal(again.centroid, profile.centroid)
    assert (again.recent, again.purchased, dict(again.brands)) == (
        profile.recent,
        profile.purchased,
        dict(profile.brands),
    )
    with pytest.raises(ValueError, match="not a stored profile"):
        Profile.from_bytes(b"garbage")


def test_a_profile_from_another_embedding_space_is_rebuilt_from_its_recent_items() -> None:
    profile = apply_events(None, [event("d1"), event("d2", t=T0 + 1)], ITEMS, CONFIG)
    foreign = dataclasses.replace(profile, space="other-encoder", centroid=np.ones(5, dtype=np.float32))
    aligned = Personalizer(store=None, config=CONFIG).align(foreign, ITEMS)  # type: ignore[arg-type]
    assert aligned.space == ITEMS.space_id and aligned.centroid.shape == profile.centroid.shape
    assert np.allclose(aligned.centroid / np.linalg.norm(aligned.centroid),
                       profile.centroid / np.linalg.norm(profile.centroid), atol=1e-5)  # fmt: skip


# -- the stores, one contract -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


StoreFactory = Callable[..., ProfileStore]


@pytest.fixture(params=["embedded", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """A factory (call it inside the event loop that uses the store): same arguments for both kinds."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    def factory(
        *, ttl_s: float = 3600.0, dedup_ttl_s: float = 3600.0, clock: Callable[[], float] | None = None
    ) -> ProfileStore:
        extra = {"clock": clock} if clock is not None else {}
        if request.param == "embedded":
            return EmbeddedProfileStore(tmp_path / "profiles.sqlite3", ttl_s=ttl_s, dedup_ttl_s=dedup_ttl_s, **extra)
        url = request.getfixturevalue("redis_url")
        return RedisProfileStore.from_url(
            url, timeout_s=2.0, ttl_s=ttl_s, dedup_ttl_s=dedup_ttl_s, prefix=prefix, **extra
        )

    return factory


def update(profile: Profile | None, events: Sequence[Event]) -> Profile:
    return apply_events(profile, events, ITEMS, CONFIG)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_record_get_and_deduplicate(make_store: StoreFactory) -> None:
    async def scenario() -> None:
        store = make_store()
        try:
            assert await store.get("alice") is None
            first = [event("d1", eid="e1", user="alice"), event("p1", eid="e2", user="alice")]
            counts = await store.record({"alice": first}, update)
            assert (counts.applied, counts.duplicates) == (2, 0)
            profile = await store.get("alice")
            assert profile is not None and profile.events == 2 and {r.item_id for r in profile.recent} == {"d1", "p1"}
            # A retry with one new event, one old, and the new one twice in the batch.
            again = [first[1], event("b1", eid="e3", user="alice"), event("b1", eid="e3", user="alice")]
            counts = await store.record({"alice": again}, update)
            assert (counts.applied, counts.duplicates) == (1, 2)
            profile = await store.get("alice")
            assert profile is not None and profile.events == 3
            # Other users are separate, even with the same event ids.
            counts = await store.record({"bob": [event("h1", eid="e1", user="bob")]}, update)
            assert counts.applied == 1
            assert await store.get("carol") is None
        finally:
            await store.close()

    run(scenario)


def test_forget_deletes_profile_and_event_ids(make_store: StoreFactory) -> None:
    async def scenario() -> None:
        store = make_store()
        try:
            events = [event("d1", eid="e1", user="alice")]
            await store.record({"alice": events, "bob": [event("p1", eid="e1", user="bob")]}, update)
            assert await store.forget("alice") is True
            assert await store.get("alice") is None
            assert await store.forget("alice") is False
            assert await store.get("bob") is not None
            # The event ids went too: the same event is a new one now.
            assert (await store.record({"alice": events}, update)).applied == 1
        finally:
            await store.close()

    run(scenario)


def test_concurrent_updates_of_one_user_all_apply(make_store: StoreFactory) -> None:
    async def scenario() -> None:
        store = make_store()
        try:
            batches = [[event("d1", EventType.VIEW, T0 + i, eid=f"e{i}", user="u")] for i in range(20)]
            results = await asyncio.gather(*(store.record({"u": b}, update) for b in batches))
            assert sum(r.applied for r in results) == 20
            profile = await store.get("u")
            assert profile is not None and profile.events == 20
            assert profile.weight == pytest.approx(sum(0.5 ** (i / DAY) for i in range(20)), rel=1e-6)
        finally:
            await store.close()

    run(scenario)


def test_a_failed_update_applies_nothing(make_store: StoreFactory) -> None:
    def broken(profile: Profile | None, events: Sequence[Event]) -> Profile:
        raise RuntimeError("boom")

    async def scenario() -> None:
        store = make_store()
        try:
            events = [event("d1", eid="e1", user="u")]
            with pytest.raises(RuntimeError):
                await store.record({"u": events}, broken)
            assert await store.get("u") is None
            assert (await store.record({"u": events}, update)).applied == 1  # the retry applies it
        finally:
            await store.close()

    run(scenario)


def test_profiles_outlive_the_store_object(make_store: StoreFactory) -> None:
    """A restart: a new store object (new sqlite connection, new Redis client) sees what was acknowledged."""

    async def scenario() -> None:
        store = make_store()
        await store.record({"u": [event("d2", eid="e1", user="u")]}, update)
        await store.close()
        reopened = make_store()
        try:
            profile = await reopened.get("u")
            assert profile is not None and profile.recent[0].item_id == "d2"
            assert (await reopened.record({"u": [event("d2", eid="e1", user="u")]}, update)).duplicates == 1
        finally:
            await reopened.close()

    run(scenario)


def test_embedded_entries_expire(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        store = EmbeddedProfileStore(tmp_path / "p.sqlite3", ttl_s=100.0, dedup_ttl_s=10.0, clock=clock)
        events = [event("d1", eid="e1")]
        await store.record({"u1": events}, update)
        clock.now += 11  # the event id is forgotten, the profile is not
        assert (await store.record({"u1": events}, update)).applied == 1
        clock.now += 101
        assert await store.get("u1") is None
        assert await store.forget("u1") is False
        await store.close()

    asyncio.run(scenario())


def test_redis_keys_expire_and_hold_no_user_id(redis_url: str) -> None:
    import redis

    async def scenario() -> None:
        store = RedisProfileStore.from_url(redis_url, timeout_s=2.0, ttl_s=0.3, dedup_ttl_s=0.3, prefix="ttl-test")
        await store.record({"user-42@example.com": [event("d1", eid="e1")]}, update)
        assert await store.get("user-42@example.com") is not None
        await asyncio.sleep(0.6)
        assert await store.get("user-42@example.com") is None
        await store.close()

    client = redis.Redis.from_url(redis_url)
    asyncio.run(scenario())
    store = RedisProfileStore.from_url(redis_url, timeout_s=2.0, ttl_s=60, dedup_ttl_s=60, prefix="ttl-test")
    asyncio.run(store.record({"user-42@example.com": [event("d1", eid="e2")]}, update))
    keys = client.keys("ttl-test:*")
    assert keys and all(b"user-42" not in k for k in keys)
    assert all(0 < client.pttl(k) <= 60_000 for k in keys)
    client.close()


def test_unreachable_redis_is_a_backend_error() -> None:
    async def scenario() -> None:
        store = RedisProfileStore.from_url("redis://127.0.0.1:1/0", timeout_s=0.5, ttl_s=60, dedup_ttl_s=60)
        with pytest.raises(BackendError):
            await store.get("u")
        with pytest.raises(BackendError):
            await store.record({"u": [event("d1")]}, update)
        await store.close()

    asyncio.run(scenario())


def test_open_store_reads_the_setting(tmp_path: Path) -> None:
    embedded = open_store("embedded", state_dir=tmp_path, ttl_s=60, dedup_ttl_s=60, timeout_s=1)
    assert isinstance(embedded, EmbeddedProfileStore) and embedded.path == tmp_path / "profiles" / "profiles.sqlite3"
    asyncio.run(embedded.close())
    assert isinstance(open_store("redis://h:1/0", state_dir=tmp_path, ttl_s=60, dedup_ttl_s=60, timeout_s=1),
                      RedisProfileStore)  # fmt: skip
    with pytest.raises(ValueError, match="embedded"):
        open_store("memcached://h", state_dir=tmp_path, ttl_s=60, dedup_ttl_s=60, timeout_s=1)


def test_redis_with_a_password(tmp_path: Path) -> None:
    """A Redis that requires AUTH: the password from the setting opens it; none, or a wrong one, is refused as a
    credential problem (the server stops at start-up), not as an outage it would wait out."""
    binary = redis_binary()
    if binary is None:
        pytest.fail(f"redis-server is not installed: {INSTALL_HINT}")
    server = RedisServer(tmp_path, binary, password="correct-horse-battery")
    server.start()

    def opened(password: str | None) -> RedisProfileStore:
        store = open_store(server.url, state_dir=tmp_path, ttl_s=60, dedup_ttl_s=60, timeout_s=2, password=password)
        assert isinstance(store, RedisProfileStore)
        return store

    async def scenario() -> None:
        store = opened("correct-horse-battery")
        await store.ping()
        await store.record({"u1": [event("d1", eid="e1")]}, update)
        assert await store.get("u1") is not None
        await store.close()
        for password in (None, "wrong-password"):
            store = opened(password)
            with pytest.raises(BackendRefused, match="authentication refused"):
                await store.ping()
            await store.close()

    async def starting(password: str) -> None:
        (tmp_path / "redis-password").write_text(password + "\n")
        settings = Settings(profile_store=server.url, profile_store_password_file=tmp_path / "redis-password")
        personalizer = await open_personalizer(settings)
        assert personalizer is not None
        await personalizer.store.close()

    try:
        asyncio.run(scenario())
        asyncio.run(starting("correct-horse-battery"))  # the file's trailing newline is not the password's
        with pytest.raises(SystemExit, match="authentication refused") as refused:
            asyncio.run(starting("wrong-password"))
        assert "wrong-password" not in str(refused.value)
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(SystemExit, match=r"profile_store_password_file: .* is empty"):
            read_secret(tmp_path / "empty", "profile_store_password_file")
    finally:
        server.stop()


def test_a_password_needs_redis_and_urls_are_redacted(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a Redis profile store"):
        open_store("embedded", state_dir=tmp_path, ttl_s=60, dedup_ttl_s=60, timeout_s=1, password="p")
    assert redacted("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redacted("rediss://ranker:s3cret@redis:6380/1") == "rediss://ranker:***@redis:6380/1"
    assert redacted("redis://redis:6379/0") == "redis://redis:6379/0"
    with pytest.raises(ValueError) as refused:
        open_store("memcached://u:s3cret@h", state_dir=tmp_path, ttl_s=60, dedup_ttl_s=60, timeout_s=1)
    assert "s3cret" not in str(refused.value)
