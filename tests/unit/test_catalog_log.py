"""The catalog change log shared by replicas: every replica applies every change, in one order.

LiveCatalog is tested over ListLog (the CatalogLog protocol over a list) and over the real Redis stream
(RedisCatalogLog, against a real redis-server); the stream itself against the real server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis

from ranker.catalog_journal import Delete, Upsert, decode_change, fold
from ranker.catalog_log import FIRST, RedisCatalogLog, after, entry_order
from ranker.domain import CatalogItem, RankQuery
from ranker.errors import BackendFailed, BackendUnavailable
from ranker.live_catalog import LiveCatalog, encoder_fingerprint
from ranker.observability import METRICS
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


def item(i: int, title: str) -> CatalogItem:
    return CatalogItem(item_id=f"n{i}", title=title)


class Paused:
    """A replica's view of the shared log whose tail waits until `resume` is set: a replica cut off for a while."""

    def __init__(self, shared: ListLog) -> None:
        self.shared = shared
        self.resume = asyncio.Event()

    async def append(self, change: Any, *, encoder: str, dim: int) -> str:
        return await self.shared.append(change, encoder=encoder, dim=dim)

    async def read(self, since: str, *, until: str | None = None) -> list[Any]:
        return await self.shared.read(since, until=until)

    async def wait(self, since: str, *, block_s: float) -> list[Any]:
        await self.resume.wait()
        return await self.shared.wait(since, block_s=block_s)

    async def compact(self) -> Any:
        return await self.shared.compact()

    async def close(self) -> None:
        pass


def test_a_compaction_keeps_every_replicas_state_and_a_new_replica_replays_only_its_result() -> None:
    async def scenario() -> None:
        shared = ListLog()
        a, b = await Replica().open(shared), await Replica().open(shared)
        behind = await Replica().open(paused := Paused(shared))
        for title in ("Werner step ladder", "Werner step ladder 6 ft", "Werner step ladder 8 ft"):
            await a.upsert([item(1, title)], timeout=5)
        await b.upsert([item(2, "Garden hose reel cart")], timeout=5)
        await b.upsert([item(3, "Brass hose nozzle")], timeout=5)
        await a.delete(["n3", "d1"])
        await until(lambda: titles(b) == titles(a))
        served = a.current(), b.current()
        assert titles(behind) != titles(a)  # its tail has applied nothing yet

        done = await shared.compact()
        assert done is not None and (done.entries_before, done.records_before) == (6, 7)
        assert (done.records_after, done.entries_after) == (4, 2)  # n1 and n2 upserted; n3 and d1 deleted
        # An up-to-date replica skips the compacted entries (its tail has read them by now): they restate what
        # it serves.
        await asyncio.sleep(0.05)
        assert (a.current(), b.current()) == served
        await a.upsert([item(4, "Cordless drill")], timeout=5)
        await until(lambda: "n4" in titles(b))
        assert titles(b) == titles(a)
        # A replica that missed the replaced entries applies the compacted ones instead, and converges.
        paused.resume.set()
        await until(lambda: titles(behind) == titles(a))
        assert titles(a)["n1"] == "Werner step ladder 8 ft" and {"n3", "d1"}.isdisjoint(titles(a))
        assert "d1" in behind.current().release.catalog.known_ids  # deleted, and still known
        fresh = Replica()
        late = await fresh.open(shared)
        assert titles(late) == titles(a) and fresh.encoder.calls == 0
        assert len(shared.records) == 3  # the compaction's 2 entries and the upsert after it
        for live in (a, b, behind, late):
            live.close()

    asyncio.run(scenario())


def test_an_append_during_a_compaction_is_kept_after_the_compacted_entries() -> None:
    async def scenario() -> None:
        shared = ListLog()
        a, b = await Replica().open(shared), await Replica().open(shared)
        await a.upsert([item(1, "Werner step ladder")], timeout=5)

        async def b_writes() -> None:
            await b.upsert([item(1, "Little Giant ladder")], timeout=5)

        shared.before_swap = b_writes
        done = await shared.compact()
        assert done is not None and done.entries_after == 2
        assert {shared.through[i] for i, *_ in shared.records} == {done.through}
        late = await Replica().open(shared)
        await until(lambda: titles(a) == titles(b) == titles(late))
        assert titles(late)["n1"] == "Little Giant ladder"  # the later change still wins
        for live in (a, b, late):
            live.close()

    asyncio.run(scenario())


def test_a_writer_compacts_the_log_once_it_has_doubled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ranker.live_catalog.COMPACT_MIN_ENTRIES", 4)
    compactions = METRICS.catalog_log_compactions.labels(result="done")

    async def scenario() -> None:
        shared = ListLog()
        a = await Replica().open(shared)
        start = compactions._value.get()
        for n in range(1, 4):
            await a.upsert([item(n, "hose")], timeout=5)
        await asyncio.sleep(0.05)
        assert len(shared.records) == 3 and not shared.through  # 3 records: below the minimum
        await a.upsert([item(4, "hose")], timeout=5)
        await until(lambda: bool(shared.through))
        assert len(shared.records) == 1 and compactions._value.get() == start + 1  # n1 to n4 in one entry
        # Now the log holds 4 records, all current: the next compaction waits until 4 more have come.
        for n in range(3):
            await a.upsert([item(1, f"ladder {n}")], timeout=5)
        await asyncio.sleep(0.05)
        assert len(shared.records) == 4
        await a.upsert([item(1, "ladder 3")], timeout=5)
        await until(lambda: len(shared.records) == 1)
        assert compactions._value.get() == start + 2
        assert titles(await Replica().open(shared)) == titles(a)
        a.close()

    asyncio.run(scenario())


def test_a_release_that_includes_the_first_changes_replays_only_the_later_ones() -> None:
    async def scenario() -> None:
        shared = ListLog()
        a = await Replica().open(shared)
        await a.upsert([item(1, "Werner step ladder")], timeout=5)
        await a.upsert([item(2, "Garden hose reel cart")], timeout=5)
        through = shared.records[0][0]
        await a.upsert([item(3, "Brass hose nozzle")], timeout=5)
        # A release exported from a catalog taken after the first change (offline.export --catalog-log-through).
        replica = Replica()
        release = replica.ranker.release
        raw = {**release.manifest.raw, "catalog_log": {"through": through}}
        manifest = dataclasses.replace(release.manifest, raw=raw)
        replica.ranker = replica.ranker.with_release(dataclasses.replace(release, manifest=manifest))
        assert manifest.catalog_log_through == through
        b = await replica.open(shared)
        assert {"n2", "n3"} <= set(titles(b)) and "n1" not in titles(b)  # n1 was to come with its catalog
        await a.delete(["n2"])
        await until(lambda: "n2" not in titles(b))
        a.close()
        b.close()

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
        assert await shared.position() == FIRST  # no log yet
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


def test_the_redis_log_compacts_in_one_step_and_keeps_the_appends_that_race_it(redis_url: str) -> None:
    async def scenario() -> None:
        shared = RedisCatalogLog.from_url(redis_url, timeout_s=2.0, block_s=0.2, prefix="log-test-4")
        other = RedisCatalogLog.from_url(redis_url, timeout_s=2.0, block_s=0.2, prefix="log-test-4")

        def upsert(item_id: str, title: str) -> Upsert:
            return Upsert((CatalogItem(item_id=item_id, title=title),), np.ones((1, 16), np.float32))

        for n in range(300):  # 100 items, 3 times each: more than one page
            await shared.append(upsert(f"x{n % 100}", f"item {n}"), encoder="e", dim=16)
        await shared.append(Delete(("x5", "gone")), encoder="e", dim=16)
        reads = 0
        read = shared.read

        async def read_while_another_replica_appends(since: str, *, until: str | None = None) -> list[Any]:
            nonlocal reads
            reads += 1
            if reads in (2, 3):  # inside the first two attempts' WATCH: each swap is refused and retried
                await other.append(upsert("x7", f"raced {reads}"), encoder="f", dim=16)
            return await read(since, until=until)

        shared.read = read_while_another_replica_appends  # type: ignore[method-assign]
        done = await shared.compact()
        assert done is not None and reads == 4
        assert (done.entries_before, done.records_before) == (303, 304)
        # 1 entry of 2 deletes, 99 upserts in entries of COMPACT_CHUNK (64), then the 2 raced upserts
        assert (done.entries_after, done.records_after) == (5, 103)
        entries = await read(FIRST)
        assert (
            len(entries) == 5 and {e.through for e in entries} == {done.through} and after(entries[-1].id, done.through)
        )
        assert [e.encoder for e in entries[-2:]] == ["f", "f"]
        upserts, deletes = fold(e.change for e in entries)
        last = {item.item_id: item.title for item, _ in upserts}
        assert last["x7"] == "raced 3" and last["x0"] == "item 200" and "x5" not in last
        assert set(deletes) == {"x5", "gone"}
        assert await shared.compact() is not None and len(await read(FIRST)) == 4  # again: x7 folded into one entry
        assert await shared.position() == (await read(FIRST))[-1].id  # where a catalog taken now would stand
        await shared.close()
        await other.close()

    asyncio.run(scenario())


def test_replicas_over_redis_compact_the_log_as_they_write(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ranker.live_catalog.COMPACT_MIN_ENTRIES", 6)

    async def scenario() -> None:
        logs = [RedisCatalogLog.from_url(redis_url, timeout_s=2.0, block_s=0.2, prefix="log-test-5") for _ in "abc"]
        a, b = await Replica().open(logs[0]), await Replica().open(logs[1])
        for n in range(6):
            await a.upsert([item(n % 3, f"ladder {n}")], timeout=5)
        for _ in range(100):  # a, at 6 records, compacts in the background
            entries = await logs[2].read(FIRST)
            if entries[0].through:
                break
            await asyncio.sleep(0.05)
        for n in (6, 7):
            await b.upsert([item(n % 3, f"ladder {n}")], timeout=5)
        await until(lambda: titles(a) == titles(b))
        entries = await logs[2].read(FIRST)
        assert [e.through is not None for e in entries] == [True, False, False]  # 3 items, then 2 upserts
        restarted = await Replica().open(logs[2])
        assert titles(restarted) == titles(a) == titles(b)
        assert titles(a)["n1"] == "ladder 7" and titles(a)["n0"] == "ladder 6"
        restarted.close()
        for live in (a, b):
            live.close()
        for shared in logs:
            await shared.close()

    asyncio.run(scenario())


def test_the_position_command_prints_where_the_log_stands(redis_url: str) -> None:
    store = redis_url.rsplit("/", 1)[0] + "/6"  # a database of its own: the rankers' key, ranker:catalog:log

    def position(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ranker", "catalog-log-position"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = position(RANKER_CATALOG_STORE=store)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) | {"store": ""} == {
        "store": "",
        "key": "ranker:catalog:log",
        "through": FIRST,
        "entries": 0,
    }

    async def append() -> str:
        shared = RedisCatalogLog.from_url(store, timeout_s=2.0, block_s=0.2)
        entry_id = await shared.append(Delete(("x1",)), encoder="e", dim=16)
        await shared.close()
        return entry_id

    entry_id = asyncio.run(append())
    assert json.loads(position(RANKER_CATALOG_STORE=store).stdout)["through"] == entry_id
    refused = position(RANKER_CATALOG_STORE="embedded")
    assert refused.returncode != 0 and "no shared catalog log" in refused.stderr
