"""Retrieval: BM25 and FAISS behave, filters hold inside the ANN, fusion and union are ordered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranker import retrieval
from ranker.config import Settings
from ranker.mapped import mappings
from ranker.retrieval import (
    EF_SEARCH,
    Analyzer,
    DenseIndex,
    LexicalIndex,
    reciprocal_rank_fusion,
    stored_vectors,
    top_rows,
    union_rows,
)

TITLES = ["cordless drill kit", "drill bits set", "interior paint white", "garden hose", ""]


def test_analyzer_stems_and_drops_stopwords() -> None:
    assert Analyzer().analyze("The Drills and a HOSE") == ["drill", "hose"]


@pytest.mark.parametrize("mapped", [True, False])
def test_bm25_scores_every_item_and_survives_save_load(tmp_path: Path, mapped: bool) -> None:
    analyzer = Analyzer()
    index = LexicalIndex.build(analyzer.analyze_many(TITLES))
    scores = index.scores(analyzer.analyze("drills"))
    assert scores.shape == (len(TITLES),)
    assert scores[0] > 0 and scores[1] > 0 and scores[2] == 0
    index.save(tmp_path)
    again = LexicalIndex.load(tmp_path, mapped=mapped)
    assert bool(mappings(next(tmp_path.glob("data*.npy")))) is mapped
    assert np.allclose(again.scores(["drill"]), index.scores(["drill"]))
    assert not index.scores(["unknownword"]).any()


def random_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_hnsw_matches_exact_search_and_honours_the_mask() -> None:
    emb = random_unit(3000, 32)
    hnsw = DenseIndex.build(emb, hnsw_threshold=1000)
    flat = DenseIndex.build(emb, hnsw_threshold=10**9)
    q = emb[17]
    assert hnsw.search(q, 10)[0] == 17
    overlap = len(set(hnsw.search(q, 50)) & set(flat.search(q, 50)))
    assert overlap >= 48
    allowed = np.zeros(len(emb), dtype=bool)
    allowed[1::2] = True
    for index in (hnsw, flat):
        hits = index.search(q, 20, allowed)
        assert len(hits) == 20 and all(h % 2 == 1 for h in hits)


@pytest.mark.parametrize("exact_rows", [retrieval.EXACT_FILTER_ROWS, 0])
def test_a_selective_filter_still_finds_every_allowed_item(monkeypatch: pytest.MonkeyPatch, exact_rows: int) -> None:
    """A graph walk with a selective filter misses allowed items: the few allowed rows are searched exactly
    (the default), and a walk that comes back short falls back to that (exact_rows 0 forces the walk)."""
    monkeypatch.setattr(retrieval, "EXACT_FILTER_ROWS", exact_rows)
    emb = random_unit(30_000, 8, seed=3)
    hnsw = DenseIndex.build(emb, hnsw_threshold=1000, hnsw_m=8, ef_construction=40)
    flat = DenseIndex.build(emb, hnsw_threshold=10**9)
    rng = np.random.default_rng(4)
    for allowed_count in (1, 5, 40, 300):
        allowed = np.zeros(len(emb), dtype=bool)
        allowed[rng.choice(len(emb), allowed_count, replace=False)] = True
        for q in random_unit(20, 8, seed=allowed_count):
            want, got = flat.search(q, 200, allowed), hnsw.search(q, 200, allowed)
            assert len(want) == len(got) == min(200, allowed_count) and allowed[got].all()
            if exact_rows or allowed_count <= 200:  # searched exactly, directly or after a short walk
                assert got.tolist() == want.tolist()


def test_top_rows_orders_by_score_then_row() -> None:
    scores = np.array([0.0, 2.0, 3.0, 2.0, 1.0])
    assert top_rows(scores, 3).tolist() == [2, 1, 3]
    assert top_rows(scores, 10, scores < 3).tolist() == [1, 3, 4]


def test_union_and_rrf() -> None:
    rows = union_rows(np.array([5, 3]), np.array([3, 9]))
    assert rows.tolist() == [5, 3, 9]
    fused = reciprocal_rank_fusion(rows, [np.array([5, 3]), np.array([3, 9])])
    assert fused[1] > fused[0] > fused[2]


def test_rrf_matches_its_definition() -> None:
    rng = np.random.default_rng(3)
    rows = rng.permutation(200)[:80]
    lists = [rng.permutation(200)[:50], rng.permutation(200)[:30]]
    expected = np.zeros(len(rows))
    for ranked in lists:
        for rank, row in enumerate(ranked):
            expected[rows == row] += 1.0 / (60 + rank + 1)
    assert reciprocal_rank_fusion(rows, lists) == pytest.approx(expected)
    assert reciprocal_rank_fusion(np.zeros(0, dtype=np.int64), lists).shape == (0,)


def test_the_service_default_search_breadth_is_the_library_default() -> None:
    assert Settings().ef_search == EF_SEARCH


@pytest.mark.parametrize("mapped", [True, False])
@pytest.mark.parametrize("items", [50, 30_000])  # exact (IndexFlatIP) and HNSW
def test_a_loaded_index_reads_rows_from_its_own_vectors(tmp_path: Path, items: int, mapped: bool) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(items, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    built = DenseIndex.build(vectors)
    built.save(tmp_path / "index.faiss", tmp_path / "embeddings.npy")
    loaded = DenseIndex.load(tmp_path / "index.faiss", tmp_path / "embeddings.npy", mapped=mapped)
    # Mapped, the rows are the file's pages (shared by every process that maps it), not a copy.
    assert bool(mappings(tmp_path / "index.faiss")) is mapped
    assert stored_vectors(loaded._index) is not None
    for row in (0, 7, items - 1):
        np.testing.assert_array_equal(loaded.search(vectors[row], 5), built.search(vectors[row], 5))
    np.testing.assert_array_equal(loaded.embeddings, vectors)
    assert not loaded.embeddings.flags.writeable
    rows = np.array([3, 1, 40])
    np.testing.assert_allclose(loaded.similarities(vectors[1], rows), vectors[rows] @ vectors[1], rtol=1e-6)


@pytest.mark.parametrize("mapped", [True, False])
def test_stored_vectors_outlive_their_index(tmp_path: Path, mapped: bool) -> None:
    """The rows are the index's memory (or its file's mapping): they stay valid after every other reference
    to the index is gone."""
    import gc

    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(30_000, 16)).astype(np.float32)
    DenseIndex.build(vectors).save(tmp_path / "index.faiss", tmp_path / "embeddings.npy")
    rows = DenseIndex.load(tmp_path / "index.faiss", tmp_path / "embeddings.npy", mapped=mapped).embeddings
    gc.collect()
    _churn = [np.ones(30_000 * 16, dtype=np.float32) for _ in range(4)]  # would reuse freed memory
    np.testing.assert_array_equal(rows, vectors)
    assert type(rows) is np.ndarray
