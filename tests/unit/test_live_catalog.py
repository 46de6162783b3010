"""Online catalog updates over fakes: rankable at once, deleted for good, atomic, journaled and replayed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from ranker import catalog_journal
from ranker.catalog_journal import JOURNAL, CatalogJournal, Delete, JournalError, JournalHeader, read
from ranker.domain import CatalogItem, RankQuery, RankResult, Rule, RuleAction
from ranker.errors import BackendUnavailable, NotConfigured
from ranker.live_catalog import ENCODE_BATCH, JOURNAL_DIR, LiveCatalog, embed_titles
from ranker.models import CachedEncoder
from ranker.pipeline import PipelineSettings, Ranker
from tests.unit.fakes import FakeEncoder, FakeScorer, FakeTokenizer, tiny_release


class Parts:
    """A Ranker over the tiny release with fakes, and the tokenizer the live catalog embeds titles with."""

    def __init__(self, *, encoder_fails: bool = False, depth: int = 5) -> None:
        self.tokenizer = FakeTokenizer()
        self.encoder = FakeEncoder(self.tokenizer.texts, fail=encoder_fails)
        self.ranker = Ranker(
            tiny_release(),
            encoder=self.encoder,
            scorer=FakeScorer(),
            tokenizer=self.tokenizer,  # type: ignore[arg-type]
            settings=PipelineSettings(dense_k=depth, lexical_k=depth),
        )

    def open(self, state_dir: Path | None) -> LiveCatalog:
        return asyncio.run(LiveCatalog.open(self.ranker, tokenizer=self.tokenizer, state_dir=state_dir))


def rank(ranker: Ranker, query: str, **kwargs: object) -> RankResult:
    request = RankQuery(request_id="r", **{"query": query, "top_k": 8, **kwargs})  # type: ignore[arg-type]
    return asyncio.run(ranker.rank(request))


def ids(result: RankResult) -> list[str]:
    return [i.item_id for i in result.items]


def upsert(live: LiveCatalog, *items: CatalogItem) -> tuple[int, int]:
    applied = asyncio.run(live.upsert(items, timeout=5))
    return applied.inserted, applied.updated


LADDER = CatalogItem(item_id="n1", title="Werner folding step ladder", category="ladders", brand="Werner", price=89.0)


def test_an_upserted_item_is_rankable_by_the_next_rank() -> None:
    live = Parts().open(None)
    assert "n1" not in ids(rank(live.current(), "folding step ladder"))
    assert upsert(live, LADDER) == (1, 0)
    result = rank(live.current(), "folding step ladder")
    assert ids(result)[0] == "n1" and not result.degraded
    top = result.items[0]
    assert live.current().release.catalog.titles[top.row] == LADDER.title
    assert {c.name for c in top.breakdown} >= {"ranker", "dense", "lexical"}
    lexical = next(c for c in top.breakdown if c.name == "lexical")
    assert lexical.raw > 0


def lexical(result: RankResult, item_id: str) -> float:
    (item,) = [i for i in result.items if i.item_id == item_id]
    return next(c.raw for c in item.breakdown if c.name == "lexical")


def test_an_update_replaces_the_item_and_what_it_matches() -> None:
    live = Parts(depth=50).open(None)  # every item is a candidate
    upsert(live, LADDER)
    assert upsert(live, CatalogItem(item_id="n1", title="Garden hose reel cart")) == (0, 1)
    new_row = live.current().release.catalog.row_of["n1"]
    for query in ("folding step ladder", "hose reel cart"):
        everything = rank(live.current(), query, top_k=20)
        assert [i.row for i in everything.items if i.item_id == "n1"] == [new_row]  # once, the new version
    assert lexical(rank(live.current(), "folding step ladder", top_k=20), "n1") == 0.0
    hose = rank(live.current(), "hose reel cart")
    assert ids(hose)[0] == "n1" and lexical(hose, "n1") > 0
    # A release item too: its old row never comes back.
    upsert(live, CatalogItem(item_id="d1", title="Garden rake"))
    drills = rank(live.current(), "DEWALT cordless drill driver", top_k=20)
    assert [i.row for i in drills.items if i.item_id == "d1"] == [live.current().release.catalog.row_of["d1"]]
    assert lexical(drills, "d1") == 0.0
    assert ids(rank(live.current(), "garden rake"))[0] == "d1"


def test_a_deleted_item_is_never_returned_again() -> None:
    live = Parts().open(None)
    applied = asyncio.run(live.delete(["d1", "no-such-id"]))
    assert applied.deleted == 1 and applied.not_found == ("no-such-id",)
    ranker = live.current()
    assert "d1" not in ids(rank(ranker, "DEWALT cordless drill driver kit"))
    # Named explicitly: rerank, pins, boosts, filters; the request still works.
    reranked = rank(ranker, "drill", candidate_ids=("d1", "d2"))
    assert ids(reranked) == ["d2"]
    pin = Rule(action=RuleAction.PIN, item_ids=frozenset({"d1"}), position=1)
    boost = Rule(action=RuleAction.BOOST, item_ids=frozenset({"d1"}), amount=100.0)
    assert "d1" not in ids(rank(ranker, "drill", rules=(pin, boost)))
    assert "d1" not in ids(rank(ranker, "drill", categories=frozenset({"power tools"}), top_k=20))
    assert "d1" not in ids(rank(ranker, "", candidate_ids=("d1", "d3")))
    assert asyncio.run(live.delete(["d1"])).not_found == ("d1",)
    # Re-created later: it is a new item.
    assert upsert(live, CatalogItem(item_id="d1", title="DEWALT drill")) == (1, 0)
    assert "d1" in ids(rank(live.current(), "dewalt drill"))


def test_a_rank_in_flight_keeps_the_catalog_it_started_with() -> None:
    live = Parts().open(None)
    before = live.current()
    upsert(live, LADDER)
    asyncio.run(live.delete(["d2"]))
    assert len(before.release.catalog) == 8 and before.release.catalog.dead is None
    old = rank(before, "folding step ladder drill")
    assert "n1" not in ids(old) and "d2" in ids(rank(before, "makita hammer drill"))
    assert "n1" in ids(rank(live.current(), "folding step ladder drill"))


def test_when_the_encoder_is_unavailable_nothing_is_applied(tmp_path: Path) -> None:
    parts = Parts(encoder_fails=True)
    live = parts.open(tmp_path)
    journal = tmp_path / JOURNAL_DIR / JOURNAL
    size = journal.stat().st_size
    before = live.current()
    with pytest.raises(BackendUnavailable):
        asyncio.run(live.upsert([LADDER], timeout=5))
    assert live.current() is before and journal.stat().st_size == size
    # Deletes need no encoder.
    assert asyncio.run(live.delete(["d1"])).deleted == 1


def test_when_the_journal_cannot_be_written_nothing_is_applied(tmp_path: Path) -> None:
    live = Parts().open(tmp_path)
    before = live.current()
    assert live._journal is not None
    os.close(live._journal._fd)  # the disk goes away under the journal
    with pytest.raises(BackendUnavailable, match="nothing was applied"):
        asyncio.run(live.upsert([LADDER], timeout=5))
    assert live.current() is before
    assert "n1" not in live.current().release.catalog.row_of


def test_changes_survive_a_restart_without_the_encoder(tmp_path: Path) -> None:
    live = Parts().open(tmp_path)
    upsert(live, LADDER, CatalogItem(item_id="n2", title="Cordless leaf blower"))
    upsert(live, CatalogItem(item_id="n2", title="Pressure washer 3000 psi"))
    asyncio.run(live.delete(["d1", "n1"]))
    expected = {q: ids(rank(live.current(), q)) for q in ("pressure washer", "leaf blower", "dewalt drill", "ladder")}
    live.close()

    restarted = Parts()
    again = restarted.open(tmp_path)
    assert restarted.encoder.calls == 0  # a journal from the same release needs no encoder
    catalog = again.current().release.catalog
    assert catalog.live_row("n1") is None and catalog.live_row("d1") is None
    assert catalog.titles[catalog.row_of["n2"]] == "Pressure washer 3000 psi"
    assert len(catalog) == 9  # replay keeps only the newest version of each item
    for query, result in expected.items():
        got = ids(rank(again.current(), query))
        assert [i for i in got if i not in ("n1", "d1")] == got, query
        assert got == result, (query, got, result)
    assert ids(rank(again.current(), "pressure washer"))[0] == "n2"


def test_a_journal_from_another_encoder_is_embedded_again(tmp_path: Path) -> None:
    live = Parts().open(tmp_path)
    upsert(live, LADDER)
    live.close()
    journal = tmp_path / JOURNAL_DIR / JOURNAL
    lines = journal.read_bytes().splitlines(keepends=True)
    header = json.loads(lines[0].split(b" ", 1)[1])
    header["encoder"] = "another-encoder"
    payload = json.dumps(header, separators=(",", ":")).encode()
    import zlib

    journal.write_bytes(b"%08x %s\n" % (zlib.crc32(payload), payload) + b"".join(lines[1:]))

    with pytest.raises(BackendUnavailable):
        Parts(encoder_fails=True).open(tmp_path)
    parts = Parts()
    again = parts.open(tmp_path)
    assert parts.encoder.calls == 1
    assert ids(rank(again.current(), "folding step ladder"))[0] == "n1"
    again.close()
    assert b"another-encoder" not in journal.read_bytes()  # rewritten for this encoder
    assert Parts(encoder_fails=True).open(tmp_path).current().release.catalog.live_row("n1") is not None


def test_a_torn_last_line_is_dropped_and_other_damage_stops_the_start(tmp_path: Path) -> None:
    live = Parts().open(tmp_path)
    upsert(live, LADDER)
    live.close()
    journal = tmp_path / JOURNAL_DIR / JOURNAL
    intact = journal.read_bytes()
    journal.write_bytes(intact + b'0badc0de {"kind": "delete", "item_')  # a crash mid-write
    again = Parts().open(tmp_path)
    assert again.current().release.catalog.live_row("n1") is not None
    assert journal.read_bytes() == intact  # the tail is cut off before anything is appended
    asyncio.run(again.delete(["n1"]))
    again.close()
    assert Parts().open(tmp_path).current().release.catalog.live_row("n1") is None

    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + lines[1].replace(b"folding", b"fold1ng") + b"".join(lines[2:]))
    with pytest.raises(JournalError, match="line 2 is damaged"):
        Parts().open(tmp_path)


def test_concurrent_batches_are_all_applied(tmp_path: Path) -> None:
    parts = Parts()
    live = parts.open(tmp_path)

    async def many() -> None:
        await asyncio.gather(
            *(live.upsert([CatalogItem(item_id=f"n{i}", title=f"item number {i}")], timeout=5) for i in range(20)),
            live.delete(["d1", "d2"]),
        )

    asyncio.run(many())
    catalog = live.current().release.catalog
    assert all(catalog.live_row(f"n{i}") is not None for i in range(20))
    assert catalog.live_row("d1") is None and len(catalog) == 28
    live.close()
    replayed = Parts(encoder_fails=True).open(tmp_path).current().release.catalog
    assert sorted(replayed.item_ids[8:]) == sorted(f"n{i}" for i in range(20))


def test_titles_are_embedded_in_batches_in_input_order() -> None:
    parts = Parts()
    titles = [f"title {i} " + "word " * (i % 7) for i in range(150)]
    vectors = asyncio.run(embed_titles(parts.encoder, parts.tokenizer, titles, dim=16, timeout=5))
    assert parts.encoder.calls == math.ceil(150 / ENCODE_BATCH)
    direct = asyncio.run(parts.encoder.encode(*parts.tokenizer(titles), timeout=None))
    np.testing.assert_allclose(vectors, direct)


def test_an_unwritable_state_folder_stops_the_start_or_turns_updates_off(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with pytest.raises(OSError):
        Parts().open(blocked)
    live = asyncio.run(LiveCatalog.open(Parts().ranker, tokenizer=FakeTokenizer(), state_dir=blocked, writable=False))
    with pytest.raises(NotConfigured, match="RANKER_STATE_DIR"):
        asyncio.run(live.upsert([LADDER], timeout=5))
    with pytest.raises(NotConfigured):
        asyncio.run(live.delete(["d1"]))
    assert ids(rank(live.current(), "cordless drill"))


def test_only_an_explicit_state_folder_must_be_writable() -> None:
    from ranker.config import Settings, load_settings

    assert "state_dir" not in Settings().model_fields_set
    assert "state_dir" in load_settings(state_dir="/somewhere").model_fields_set


def test_a_journal_replaced_by_the_next_catalog_takes_no_more_appends_from_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A swap's next catalog rewrites the journal (os.replace) before the switch. Should the swap fail after
    # that, the serving catalog's descriptor points at the replaced, unlinked file: an update appended
    # there would be acknowledged and then lost at restart. It is refused instead.
    path = tmp_path / JOURNAL
    header = JournalHeader(release_id="rel-A", encoder="enc", dim=4)
    serving, _, _ = CatalogJournal.open(path)
    serving.rewrite(header, [])
    serving.append(Delete(("a",)))
    following, _, changes = CatalogJournal.open(path)
    monkeypatch.setattr(catalog_journal, "_fsync_directory", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        following.rewrite(dataclasses.replace(header, release_id="rel-B"), changes)  # fails after the rename
    following.append(Delete(("b",)))  # the new writer's descriptor is the file at the path
    with pytest.raises(JournalError, match="replaced"):
        serving.append(Delete(("c",)))
    assert [c.item_ids for c in read(path)[1]] == [("a",), ("b",)]


def broken_fsync(directory: Path) -> None:
    raise OSError(5, "Input/output error")


def test_deleting_an_absent_id_journals_nothing(tmp_path: Path) -> None:
    """Nothing to delete, nothing journaled: otherwise the next release that has the id would start with it
    deleted."""
    live = Parts().open(tmp_path)
    journal = tmp_path / JOURNAL_DIR / JOURNAL
    size = journal.stat().st_size
    applied = asyncio.run(live.delete(["not-yet-an-item"]))
    assert applied.not_found == ("not-yet-an-item",) and journal.stat().st_size == size
    applied = asyncio.run(live.delete(["d1", "not-yet-an-item"]))
    assert applied.deleted == 1
    deletes = [change for change in read(journal)[1] if isinstance(change, Delete)]
    assert [change.item_ids for change in deletes] == [("d1",)]
    live.close()


def test_titles_bypass_the_query_cache() -> None:
    """A one-title batch is not a query: it neither fills the query cache nor takes the cache's timeout."""
    parts = Parts()
    lookups: list[bool] = []
    cached = CachedEncoder(parts.encoder, 100, on_lookup=lookups.append, fetch_timeout=0.001)
    vectors = asyncio.run(embed_titles(cached, parts.tokenizer, ["Werner step ladder"], dim=16, timeout=5))
    assert vectors.shape == (1, 16) and lookups == [] and len(cached) == 0


def test_an_item_created_and_deleted_online_stays_known_after_a_restart(tmp_path: Path) -> None:
    live = Parts().open(tmp_path)
    upsert(live, LADDER)
    asyncio.run(live.delete(["n1"]))
    live.close()

    again = Parts().open(tmp_path)  # the journal folds the upsert away and keeps only the delete
    catalog = again.current().release.catalog
    assert "n1" not in catalog.row_of and "n1" in catalog.known_ids
    # A request naming it is valid, as for any deleted item, and the item ranks nowhere.
    pinned = Rule(action=RuleAction.PIN, item_ids=frozenset({"n1"}), position=1)
    result = rank(again.current(), "ladder", candidate_ids=("n1", "d1"), rules=(pinned,))
    assert ids(result) == ["d1"]
    assert "n1" not in ids(rank(again.current(), "ladder"))
    # Deleting it again finds nothing to delete, and an upsert brings it back.
    assert asyncio.run(again.delete(["n1"])).not_found == ("n1",)
    upsert(again, LADDER)
    assert ids(rank(again.current(), "folding step ladder"))[0] == "n1"
