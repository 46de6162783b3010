"""The catalog overlay: appended rows score, search and filter like release rows; snapshots never change."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ranker.catalog_overlay import CatalogSnapshot, RowStore
from ranker.domain import CatalogItem
from ranker.features import FEATURE_NAMES
from ranker.neighbours import ItemNeighbours
from ranker.release import Catalog, Manifest, Release
from ranker.retrieval import Analyzer, DenseIndex, HybridRetriever, LexicalIndex
from tests.unit.fakes import embed, tiny_release

WORDS = ("drill", "saw", "paint", "hose", "ladder", "bit", "blade", "primer", "nozzle", "step", "cordless", "garden")


def synthetic_release(n: int, *, seed: int = 0, dim: int = 16, hnsw_threshold: int = 20_000) -> Release:
    """n items with titles drawn from WORDS (repeats included) and random unit embeddings."""
    rng = np.random.default_rng(seed)
    titles = [" ".join(rng.choice(WORDS, size=rng.integers(1, 7))) for _ in range(n)]
    frame = pl.DataFrame({"item_id": [f"i{r}" for r in range(n)], "title": titles})
    analyzer = Analyzer()
    catalog = Catalog.from_frame(frame, analyzer)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    dense = DenseIndex.build(vectors, hnsw_threshold=hnsw_threshold)
    manifest = Manifest.from_json(
        {
            "format": 1,
            "release_id": "synthetic",
            "created_at": "2026-01-01T00:00:00Z",
            "models": {
                "text_encoder": {"version": 1, "dim": dim, "max_query_tokens": 8},
                "ranker": {"version": 1, "features": list(FEATURE_NAMES)},
            },
            "index": {"items": n},
        }
    )
    retriever = HybridRetriever(dense, LexicalIndex.build(analyzer.analyze_many(catalog.titles)))
    path = Path("/nonexistent")
    return Release(path=path, manifest=manifest, catalog=catalog, retriever=retriever, analyzer=analyzer)


def item(item_id: str, title: str, **attributes: object) -> CatalogItem:
    return CatalogItem(item_id=item_id, title=title, **attributes)  # type: ignore[arg-type]


def test_an_appended_copy_of_a_release_item_gets_the_same_bm25_score() -> None:
    release = synthetic_release(300)
    snapshot = CatalogSnapshot.of(release)
    rows = [0, 7, 42, 299]
    copies = [(item(f"copy{r}", release.catalog.titles[r]), np.zeros(16, np.float32)) for r in rows]
    after, applied = snapshot.apply(copies)
    assert applied.inserted == 4 and applied.updated == 0
    lexical = after.release.retriever.lexical
    for query in ("drill", "paint primer", "cordless drill drill", "garden hose nozzle", "steel"):
        tokens = release.analyzer.analyze(query)
        scores = lexical.scores(tokens)
        assert scores.shape == (304,)
        np.testing.assert_allclose(scores[:300], release.retriever.lexical.scores(tokens), rtol=1e-6)
        np.testing.assert_allclose(scores[300:], scores[rows], rtol=1e-5, atol=1e-6)


def test_a_term_new_to_the_catalog_matches_only_the_items_that_have_it() -> None:
    release = synthetic_release(200)
    after, _ = CatalogSnapshot.of(release).apply([(item("new", "zorblax drill"), np.zeros(16, np.float32))])
    scores = after.release.retriever.lexical.scores(release.analyzer.analyze("zorblax"))
    assert np.flatnonzero(scores).tolist() == [200]
    deleted, _ = after.apply([], ["new"])
    assert not deleted.release.retriever.lexical.scores(release.analyzer.analyze("zorblax")).any()


@pytest.mark.parametrize("hnsw_threshold", [10**9, 100])
def test_dense_search_over_release_and_appended_rows_is_the_exact_top_k(hnsw_threshold: int) -> None:
    release = synthetic_release(500, hnsw_threshold=hnsw_threshold)
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(60, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    upserts = [(item(f"n{i}", "drill"), v) for i, v in enumerate(vectors)]
    upserts += [(item("i3", "replaced"), vectors[0])]  # replaces release row 3
    snapshot, applied = CatalogSnapshot.of(release).apply(upserts, ["i5", "n7"])
    assert (applied.inserted, applied.updated, applied.deleted) == (60, 1, 1)  # n7 is not there yet
    assert applied.not_found == ("n7",)
    dense = snapshot.release.retriever.dense
    everything = np.asarray(dense.embeddings)
    allowed = np.ones(len(everything), dtype=bool)
    allowed[rng.choice(len(everything), 80, replace=False)] = False
    for query in rng.normal(size=(10, 16)).astype(np.float32):
        query /= np.linalg.norm(query)
        for mask in (None, allowed):
            got = dense.search(query, 20, mask)
            dead = snapshot.catalog.dead
            assert dead is not None
            keep = ~dead if mask is None else mask & ~dead
            rows = np.flatnonzero(keep)
            expected = rows[np.argsort(-(everything[rows] @ query), kind="stable")[:20]]
            assert set(got.tolist()) == set(expected.tolist())
            assert not dead[got].any()


def test_the_release_list_keeps_its_order_and_appended_rows_slot_in_by_score() -> None:
    release = synthetic_release(50)
    base = release.retriever.dense
    query = np.asarray(base.embeddings[10])
    best = np.asarray(base.embeddings[10]).copy()  # an appended twin of the best hit ties with it
    snapshot, _ = CatalogSnapshot.of(release).apply([(item("twin", "twin"), best)])
    got = snapshot.release.retriever.dense.search(query, 5)
    release_only = base.search(query, 5)
    assert got[0] == release_only[0] == 10 and got[1] == 50
    assert [r for r in got if r < 50] == release_only[:4].tolist()


def test_snapshots_never_change_when_later_batches_are_applied() -> None:
    release = tiny_release()
    first, _ = CatalogSnapshot.of(release).apply([(item("n1", "folding step ladder"), embed("ladder"))])
    frozen_len = len(first.catalog)
    frozen_rows = np.asarray(first.release.retriever.dense.embeddings).copy()
    second, applied = first.apply([(item("n1", "hose reel"), embed("hose")), (item("n2", "saw"), embed("saw"))])
    assert applied.updated == 1 and applied.inserted == 1
    assert len(first.catalog) == frozen_len == len(release.catalog) + 1
    assert first.catalog.titles[-1] == "folding step ladder" and first.catalog.dead is not None
    assert not first.catalog.dead.any()
    np.testing.assert_array_equal(first.release.retriever.dense.embeddings, frozen_rows)
    assert second.catalog.row_of["n1"] == frozen_len
    assert second.catalog.dead is not None and second.catalog.dead[frozen_len - 1]
    assert len(release.catalog) == 8 and release.catalog.dead is None  # the release itself is untouched


def test_row_store_writes_in_place_only_past_every_snapshot() -> None:
    store = RowStore(np.zeros((2, 3), np.float32), 2)
    grown, view = store.append(2, np.ones((1, 3), np.float32))
    assert grown is not store and view.shape == (3, 3) and len(grown.data) > 3
    again, view2 = grown.append(3, np.full((1, 3), 2, np.float32))
    assert again is grown and view2.base is grown.data and view[2, 0] == 1
    # Appending from an older snapshot (3 rows, store already filled to 4) must not overwrite row 3.
    fork, view3 = grown.append(3, np.full((1, 3), 7, np.float32))
    assert fork is not grown and view2[3, 0] == 2 and view3[3, 0] == 7


def test_deleted_and_replaced_rows_are_masked_and_ids_stay_known() -> None:
    release = tiny_release()
    snapshot, applied = CatalogSnapshot.of(release).apply([(item("p1", "Behr paint"), embed("paint"))], ["d1"])
    catalog = snapshot.catalog
    assert (applied.inserted, applied.updated, applied.deleted) == (0, 1, 1)
    mask = catalog.mask(categories=frozenset(), min_price=None, max_price=None)
    assert mask is not None and mask.sum() == len(release.catalog) - 1  # 9 rows, 2 dead
    assert catalog.live_row("d1") is None and "d1" in catalog.row_of
    assert catalog.live_row("p1") == 8 and not mask[release.catalog.row_of["p1"]]
    _, applied = snapshot.apply([], ["d1", "p1"])
    assert applied.deleted == 1 and applied.not_found == ("d1",)


def test_an_item_given_again_keeps_its_interactions_and_neighbours() -> None:
    release = tiny_release()
    n = len(release.catalog)
    # row 0 (d1) is the most interacted-with item; rows 5 and 6 (p1, p2) are bought together
    release = replace(release, neighbours=ItemNeighbours.build([[0, 1], [0, 2], [0, 3], [5, 6], [5, 6]], n))
    before = release.neighbours
    assert before is not None
    snapshot, _ = CatalogSnapshot.of(release).apply(
        [
            (item("d1", "DEWALT 20V cordless drill", price=119.0), embed("drill")),
            (item("p2", "Behr primer"), embed("paint")),
        ]
    )
    d1, p2 = snapshot.catalog.live_row("d1"), snapshot.catalog.live_row("p2")
    assert (d1, p2) == (n, n + 1)
    after = snapshot.release.neighbours
    assert after is not None and after.num_items == n + 2
    assert after.popularity(np.array([d1, 0]))[0] == before.popularity(np.array([0]))[0] > 0
    assert after.popularity(np.array([0]))[0] == 0.0  # the dead row keeps nothing
    # p1's neighbour p2 now points at p2's new row, and d1's neighbours come from its new row
    assert after.spread(np.array([5]), np.ones(1), n + 2)[p2] == before.spread(np.array([5]), np.ones(1), n)[6] > 0
    moved = after.spread(np.array([d1]), np.ones(1), n + 2)
    np.testing.assert_array_equal(moved[:n], before.spread(np.array([0]), np.ones(1), n))


def test_attributes_follow_the_release_conventions() -> None:
    release = tiny_release()  # no popularity, no stock, no created_at columns
    new = item(
        "n1", "step ladder", category="ladders", brand="Werner", price=99.0, popularity=5.0, in_stock=True,
        created_at=date(2026, 1, 1),
    )  # fmt: skip
    snapshot, _ = CatalogSnapshot.of(release, as_of=date(2026, 1, 11)).apply([(new, embed("ladder"))])
    catalog = snapshot.catalog
    row = catalog.row_of["n1"]
    assert catalog.categories[row] == "ladders" and catalog.brands[row] == "Werner" and catalog.prices[row] == 99.0
    assert catalog.signals["popularity"][row] == 5.0 and np.isnan(catalog.signals["popularity"][:row]).all()
    assert catalog.signals["freshness"][row] == -10.0
    assert catalog.in_stock is not None and catalog.in_stock[row] and not catalog.in_stock[:row].any()
    assert catalog.rows_with("category", ["ladders"]).tolist() == [row]
    assert catalog.text.title_terms[row] == 2  # "step", "ladder"
    in_ladders = catalog.mask(categories=frozenset({"ladders"}), min_price=None, max_price=None)
    assert in_ladders is not None and np.flatnonzero(in_ladders).tolist() == [row]
