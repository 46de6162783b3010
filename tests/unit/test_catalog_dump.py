"""offline.catalog_dump: a release's items with the shared catalog log folded over them, as the next catalog."""

from __future__ import annotations

import asyncio
import json
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from offline import catalog_dump
from offline.data import load_catalog
from ranker.catalog_journal import Delete, Upsert
from ranker.catalog_log import RedisCatalogLog
from ranker.domain import CatalogItem
from tests.unit.fakes import ListLog, tiny_release

SCHEMA = {
    "item_id": pl.Utf8,
    "title": pl.Utf8,
    "category": pl.Utf8,
    "brand": pl.Utf8,
    "price": pl.Float64,
    "popularity": pl.Float64,
    "rating": pl.Float64,
    "margin": pl.Float64,
    "boost": pl.Float64,
    "in_stock": pl.Boolean,
    "created_at": pl.Date,
}
ROWS = [
    ("a1", "Werner 6 ft fiberglass step ladder", "c3:ladder", "Werner", 89.0, None, None, None, None, True, None),
    ("a2", "Garden hose reel cart", "c7:hose-reel", None, 49.5, None, None, None, None, None, None),
    ("a3", "Brass hose nozzle", "c7:hose-reel", None, 9.99, None, None, None, None, None, None),
    ("a4", "Hampton Bay ceiling fan", "c9:fan", "Hampton Bay", 129.0, 0.7, 4.5, None, None, True, date(2025, 5, 1)),
]
LADDER = CatalogItem(item_id="a1", title="Werner 8 ft step ladder", category="ladders", price=119.0, in_stock=False)
DRILL = CatalogItem(item_id="n1", title="Cordless drill", brand="DEWALT", created_at=date(2026, 11, 1))


def items() -> pl.DataFrame:
    return pl.DataFrame(ROWS, schema=SCHEMA, orient="row")


def release_folder(tmp_path: Path, *, through: str | None = None) -> Path:
    """A release folder with what the dump reads: manifest.json (category derived for every item) and items.parquet."""
    folder = tmp_path / "release"
    folder.mkdir()
    raw = {**tiny_release().manifest.raw, "data": {"attributes": {"category": {"given": 0, "derived": 3}}}}
    if through is not None:
        raw["catalog_log"] = {"through": through}
    (folder / "manifest.json").write_text(json.dumps(raw))
    items().write_parquet(folder / "items.parquet")
    return folder


async def write(shared: ListLog | RedisCatalogLog) -> None:
    vectors = np.ones((1, 16), np.float32)
    await shared.append(Upsert((CatalogItem(item_id="a2", title="Old title"),), vectors), encoder="e", dim=16)
    await shared.append(Upsert((LADDER,), vectors), encoder="e", dim=16)
    await shared.append(Upsert((DRILL,), vectors), encoder="e", dim=16)
    await shared.append(Delete(("a3", "never-there")), encoder="e", dim=16)


def test_the_log_is_folded_over_the_release_and_derived_attributes_are_left_to_the_next_export(tmp_path: Path) -> None:
    async def scenario() -> None:
        shared = ListLog()
        await write(shared)
        report = await catalog_dump.dump(release_folder(tmp_path), tmp_path / "catalog.csv", shared)
        assert report["through"] == shared.records[-1][0] and report["entries"] == 4
        assert (report["items"], report["upserted"], report["added"], report["deleted"]) == (4, 3, 1, 1)
        assert report["emptied_derived_attributes"] == ["category"]
        catalog = {row["item_id"]: row for row in load_catalog(tmp_path / "catalog.csv").to_dicts()}
        assert set(catalog) == {"a1", "a2", "a4", "n1"}
        ladder, reel, drill, fan = catalog["a1"], catalog["a2"], catalog["n1"], catalog["a4"]
        assert (ladder["title"], ladder["category"], ladder["price"], ladder["in_stock"]) == (
            LADDER.title, "ladders", 119.0, False,  # the upsert's own category is kept
        )  # fmt: skip
        assert ladder["brand"] is None  # an upsert states the whole item: the release's brand is gone
        assert reel["title"] == "Old title" and reel["category"] is None
        # An item no entry touched keeps its row, but not the category the release derived for it: the next
        # export derives categories again over the new catalog. Its given values round-trip.
        assert (fan["category"], fan["brand"], fan["price"], fan["popularity"], fan["rating"]) == (
            None, "Hampton Bay", 129.0, 0.7, 4.5,
        )  # fmt: skip
        assert (fan["in_stock"], fan["created_at"]) == (True, date(2025, 5, 1))
        assert (drill["brand"], drill["created_at"]) == ("DEWALT", date(2026, 11, 1))

    asyncio.run(scenario())


def test_a_release_with_a_position_gets_only_the_later_entries(tmp_path: Path) -> None:
    async def scenario() -> None:
        shared = ListLog()
        await write(shared)
        release = release_folder(tmp_path, through=shared.records[1][0])  # it has a2's and a1's changes
        report = await catalog_dump.dump(release, tmp_path / "catalog.parquet", shared)
        assert (report["entries"], report["upserted"], report["deleted"]) == (2, 1, 1)
        catalog = {row["item_id"]: row for row in load_catalog(tmp_path / "catalog.parquet").to_dicts()}
        assert catalog["a1"]["title"] == ROWS[0][1] and catalog["a2"]["title"] == ROWS[1][1]
        assert "n1" in catalog and "a3" not in catalog and catalog["a4"]["category"] is None

    asyncio.run(scenario())


def test_the_command_reads_the_rankers_catalog_store(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = redis_url.rsplit("/", 1)[0] + "/5"  # a database of its own: the rankers' key, ranker:catalog:log

    async def fill() -> None:
        shared = RedisCatalogLog.from_url(store, timeout_s=2.0, block_s=0.2)
        await write(shared)
        await shared.compact()  # the fold is the same over a compacted log
        await shared.close()

    asyncio.run(fill())
    monkeypatch.setenv("RANKER_CATALOG_STORE", store)
    release = release_folder(tmp_path)
    assert catalog_dump.main(["--release", str(release), "--out", str(tmp_path / "catalog.csv")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["items"], report["upserted"], report["deleted"]) == (4, 3, 1)
    assert set(load_catalog(tmp_path / "catalog.csv")["item_id"].to_list()) == {"a1", "a2", "a4", "n1"}
    monkeypatch.setenv("RANKER_CATALOG_STORE", "embedded")
    with pytest.raises(SystemExit, match="no shared catalog log"):
        catalog_dump.main(["--release", str(release), "--out", str(tmp_path / "other.csv")])
