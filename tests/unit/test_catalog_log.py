"""The catalog change log shared by replicas: every replica applies every change, in one order.

LiveCatalog is tested over ListLog (the CatalogLog protocol over a list) and over the real Redis stream
(RedisCatalogLog, against a real redis-server); the stream itself against the real server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis

from ranker.catalog_journal import Delete, Upsert, decode_change
from ranker.catalog_log import FIRST, RedisCatalogLog, after, entry_order
from ranker.domain import CatalogItem, RankQuery
from ranker.errors import BackendFailed, BackendUnavailable
from ranker.live_catalog import LiveCatalog, encoder_fingerprint
from ranker.pipeline import PipelineSettings, Ranker
from tests.unit.fakes import FakeEncoder, FakeScorer, FakeTokenizer, ListLog, embed, tiny_release

LADDER = CatalogItem(item_id="n1", title="Werner folding step ladder", category="ladders", brand="Werner", price=89.0)
REEL = CatalogItem(item_id="n1", title="Garden hose reel cart")


class Replica:
    """One ranker's pipeline over the tiny release, with fakes."""

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.encoder = FakeEncoder(self.tokenizer.texts)
        self.ranker = Ranker(
            tiny_release(),
            encoder=self.encoder,
            scorer=FakeScorer(),
            tokenizer=self.tokenizer,  # type: ignore[arg-type]
            settings=PipelineSettings(dense_k=50, lexical_k=50),
        )

    async def open(self, shared: Any) -> LiveCatalog:
        return await LiveCatalog.open_shared(self.ranker, tokenizer=self.tokenizer, shared=shared)


async def ranked(live: LiveCatalog, query: str) -> list[str]:
    result = await live.current().rank(RankQuery(request_id="r", query=query, top_k=20))
    return [item.item_id for item in result.items]


def titles(live: LiveCatalog) -> dict[str, str]:
    """Every live item's title."""
    catalog = live.current().release.catalog
    dead = catalog.dead if catalog.dead is not None else np.zeros(len(catalog), dtype=bool)
    return {item_id: catalog.titles[row] for item_id, row in catalog.row_of.items() if not dead[row]}


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not applied in time"
        await asyncio.sleep(0.01)


def test_a_change_on_one_replica_reaches_the_other() -> None:
    async def scenario() -> None:
        shared = ListLog()
        a, b = await Replica().open(shared), await Replica().open(shared)
        await a.upsert([LADDER], timeout=5)
        assert (await ranked(a, "folding step ladder"))[0] == "n1"  # read your writes: at once on the writer
        await until(lambda: "n1" in titles(b))
        assert (await ranked(b, "folding step ladder"))[0] == "n1"
        applied = await b.delete(["n1", "d1"])
        assert applied.deleted == 2 and not applied.not_found
        await until(lambda: "n1" not in titles(a) and "d1" not in titles(a))
        assert "n1" not in await ranked(a, "folding step ladder")
        a.close()
        b.close()

    asyncio.run(scenario())


def test_replicas_end_in_the_same_state_whatever_order_they_wrote_in() -> None:
    async def scenario() -> None:
        shared = ListLog()
        a, b = await Replica().open(shared), await Replica().open(shared)
        await asyncio.gather(
            a.upsert([LADDER], timeout=5),
            b.upsert([REEL], timeout=5),
            a.delete(["d1"]),
            b.upsert([CatalogItem(item_id="n2", title="Brass garden hose nozzle")], timeout=5),
        )
        await until(lambda: titles(a) == titles(b))
        changes = [decode_change(data, dim) for _, data, _, dim in shared.records]
        n1 = [c.items[0].title for c in changes if isinstance(c, Upsert) and c.items[0].item_id == "n1"]
        assert len(n1) == 2 and titles(a)["n1"] == n1[-1]  # the later entry in the log wins, on both
        assert "d1" not in titles(a) and "n2" in titles(a)
        a.close()
        b.close()

    asyncio.run(scenario())


def test_an_entry_appended_between_catch_up_and_append_is_applied_first() -> None:
    async def scenario() -> None:
        shared = ListLog()
        a, b = await Replica().open(shared), await Replica().open(shared)
        b.close()  # b writes through the log only, with no tail to apply a's change for it

        async def b_writes_first() -> None:
            fingerprint = encoder_fingerprint(b.current().release.manifest)
            await shared.append(Upsert((REEL,), embed(REEL.title)[None, :]), encoder=fingerprint, dim=16)

        shared.before_append = b_writes_first
        applied = await a.upsert([LADDER], timeout=5)
        # The log says REEL then LADDER, so LADDER is the item, and a's upsert replaced REEL (an update).
        assert (applied.inserted, applied.updated) == (0, 1)
        assert titles(a)["n1"] == LADDER.title
        fresh = await Replica().open(shared)
        assert titles(fresh) == titles(a)
        a.close()
        fresh.close()

    asyncio.run(scenario())


def test_a_new_replica_replays_the_log_and_deletes_of_absent_ids_are_not_logged() -> None:
    async def scenario() -> None:
        shared = ListLog()
        a = await Replica().open(shared)
        await a.upsert([LADDER], timeout=5)
        await a.delete(["n1"])
        applied = await a.delete(["no-such-item"])
        assert applied.not_found == ("no-such-item",) and len(shared.records) == 2
        later = Replica()
        b = await later.open(shared)
        assert later.encoder.calls == 0  # the log's embeddings are used as they are
        assert "n1" not in titles(b) and "n1" in b.current().release.catalog.known_ids  # deleted, still known
        a.close()
        b.close()

    asyncio.run(scenario())


def test_entries_from_another_text_encoder_are_embedded_again() -> None:
    async def scenario() -> None:
        shared = ListLog()
        await shared.append(Upsert((LADDER,), np.ones((1, 16), np.float32) / 4), encoder="another encoder", dim=16)
        replica = Replica()
        live = await replica.open(shared)
        assert replica.encoder.calls == 1
        row = live.current().release.catalog.row_of["n1"]
        vector = live.current().release.retriever.dense.embeddings[row]
        assert np.allclose(vector, embed(LADDER.title), atol=1e-6)
        live.close()

    asyncio.run(scenario())


def test_when_the_log_is_unreachable_nothing_is_applied_and_the_tail_catches_up_later() -> None:
    async def scenario() -> None:
        shared = ListLog()
        a, b = await Replica().open(shared), await Replica().open(shared)
        shared.fail = True
        with pytest.raises(BackendUnavailable):
            await a.upsert([LADDER], timeout=5)
        assert "n1" not in titles(a) and not shared.records
        await asyncio.sleep(0.05)  # b's tail meets the failure and retries
        shared.fail = False
        await a.upsert([LADDER], timeout=5)
        await until(lambda: "n1" in titles(b), timeout=10)
        a.close()
        b.close()

    asyncio.run(scenario())


def test_a_closed_catalog_stops_following() -> None:
    async def scenario() -> None:
        shared = ListLog()
        a, b = await Replica().open(shared), await Replica().open(shared)
        b.close()
        await a.upsert([LADDER], timeout=5)
        await asyncio.sleep(0.1)
        assert "n1" not in titles(b)
        a.close()

    asyncio.run(scenario())


# --- the Redis stream, against a real redis-server ---


def test_stream_ids_order_numerically() -> None:
    assert entry_order("1700000000000-2") < entry_order("1700000000000-10") < entry_order("1700000000001-0")
    assert after("10-0", "9-5") and not after("9-5", "9-5")


def test_the_redis_log_appends_reads_pages_and_waits(redis_url: str) -> None:
    async def scenario() -> None:
        shared = RedisCatalogLog.from_url(redis_url, timeout_s=2.0, block_s=0.2, prefix="log-test-1")
        await shared.check()
        assert shared.durable is False  # the test server has no append-only file
        ids = []
        for i in range(300):  # more than one page
            item = CatalogItem(item_id=f"x{i}", title=f"item {i}")
            ids.append(await shared.append(Upsert((item,), np.full((1, 16), i, np.float32)), encoder="e", dim=16))
        ids.append(await shared.append(Delete(("x1",)), encoder="e", dim=16))
        entries = await shared.read(FIRST)
        assert [e.id for e in entries] == ids and await shared.length() == 301
        assert isinstance(entries[-1].change, Delete) and entries[-1].change.item_ids == ("x1",)
        first = entries[5].change
        assert isinstance(first, Upsert) and first.items[0].title == "item 5" and first.embeddings[0, 0] == 5
        assert [e.id for e in await shared.read(ids[10], until=ids[12])] == ids[11:13]
        assert await shared.wait(ids[-1], block_s=0.2) == []
        waiter = asyncio.create_task(shared.wait(ids[-1], block_s=2.0))
        await asyncio.sleep(0.05)
        new = await shared.append(Delete(("x2",)), encoder="e", dim=16)
        assert [e.id for e in await waiter] == [new]
        await shared.close()

    asyncio.run(scenario())


def test_a_damaged_entry_is_a_backend_failure(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.xadd("log-test-2:catalog:log", {"change": b"0000 {}\n", "encoder": "e", "dim": "16"})

    async def scenario() -> None:
        shared = RedisCatalogLog.from_url(redis_url, timeout_s=2.0, block_s=0.2, prefix="log-test-2")
        with pytest.raises(BackendFailed, match="damaged"):
            await shared.read(FIRST)
        await shared.close()

    asyncio.run(scenario())


def test_replicas_share_changes_through_redis(redis_url: str) -> None:
    async def scenario() -> None:
        logs = [RedisCatalogLog.from_url(redis_url, timeout_s=2.0, block_s=0.2, prefix="log-test-3") for _ in "ab"]
        a, b = await Replica().open(logs[0]), await Replica().open(logs[1])
        await a.upsert([LADDER], timeout=5)
        await until(lambda: "n1" in titles(b))
        await b.upsert([REEL], timeout=5)
        await until(lambda: titles(a).get("n1") == REEL.title)
        restarted = await Replica().open(logs[0])
        assert titles(restarted) == titles(a) == titles(b)
        for live in (a, b, restarted):
            live.close()
        for shared in logs:
            await shared.close()

    asyncio.run(scenario())
