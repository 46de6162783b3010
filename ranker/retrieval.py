"""Candidate retrieval: lexical BM25 (bm25s) and dense ANN (FAISS), and their fusion.

The offline export builds and saves these indexes with the same classes the service loads, so
evaluation and serving retrieve through one implementation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import bm25s
import faiss
import numpy as np
import Stemmer
from bm25s.stopwords import STOPWORDS_EN

from ranker.mapped import populate

_WORD = re.compile(r"(?u)\b\w\w+\b")
_STOPWORDS = frozenset(STOPWORDS_EN)


class Analyzer:
    """Lower-case words of two or more characters, English stopwords removed, Snowball-stemmed."""

    def __init__(self) -> None:
        self._stemmer = Stemmer.Stemmer("english")

    def analyze(self, text: str) -> list[str]:
        words = [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]
        return self._stemmer.stemWords(words) if words else []

    def analyze_many(self, texts: Iterable[str]) -> list[list[str]]:
        return [self.analyze(t) for t in texts]


@dataclass(frozen=True, kw_only=True)
class BM25Parameters:
    method: str  # bm25s scoring variant, e.g. "lucene"
    idf_method: str
    k1: float
    b: float


class LexicalIndex:
    """BM25 over analysed item text; scores the whole corpus for one query."""

    def __init__(self, bm25: bm25s.BM25, num_items: int) -> None:
        self._bm25 = bm25
        self.num_items = num_items

    @classmethod
    def build(cls, token_lists: Sequence[Sequence[str]]) -> LexicalIndex:
        # bm25s keeps no document without a token; an empty title still needs its row.
        corpus = [list(tokens) if tokens else ["\x00empty"] for tokens in token_lists]
        bm25 = bm25s.BM25()
        bm25.index(corpus, show_progress=False)
        return cls(bm25, len(corpus))

    def save(self, directory: Path) -> None:
        self._bm25.save(str(directory))
        (directory / "lexical.json").write_text(json.dumps({"num_items": self.num_items}))

    @classmethod
    def load(cls, directory: Path, *, mapped: bool = True) -> LexicalIndex:
        """The saved index; `mapped`: its score arrays are the files mapped read-only (ranker.mapped)."""
        meta = json.loads((directory / "lexical.json").read_text())
        bm25 = bm25s.BM25.load(str(directory), mmap=mapped, show_progress=False)
        if mapped:
            for array in sorted(directory.glob("*.npy")):
                populate(array)
        return cls(bm25, int(meta["num_items"]))

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """BM25 score of every item (float32, one per row); zeros when no query term is indexed."""
        ids = self._bm25.get_tokens_ids(list(query_tokens))
        if not ids:
            return np.zeros(self.num_items, dtype=np.float32)
        return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float32)

    def parameters(self) -> BM25Parameters:
        """The BM25 variant and constants the index was built with."""
        bm25 = self._bm25
        return BM25Parameters(method=str(bm25.method), idf_method=str(bm25.idf_method), k1=bm25.k1, b=bm25.b)

    def document_frequency(self, term: str) -> int:
        """How many items contain the (analysed) term; 0 for a term the index has never seen."""
        term_id = self._bm25.vocab_dict.get(term)
        if term_id is None:
            return 0
        indptr = self._bm25.scores["indptr"]
        return int(indptr[term_id + 1] - indptr[term_id])


class LexicalRetriever(Protocol):
    """What retrieval uses of a lexical index: LexicalIndex, or LexicalIndex plus the items added online
    (ranker.catalog_overlay.OverlayLexical). Row ids are the catalog's item rows."""

    @property
    def num_items(self) -> int: ...

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """BM25 score of every item (float32, one per row)."""
        ...


@runtime_checkable
class DenseRetriever(Protocol):
    """What retrieval, features and diversity use of a dense index: FAISS (DenseIndex) or a vector engine
    (ranker.vector_engine.QdrantDenseIndex). Row ids are the release's item rows."""

    @property
    def num_items(self) -> int: ...

    @property
    def remote(self) -> bool:
        """True when search() waits on another process (a vector engine): the pipeline then runs it on a worker
        thread within the request's deadline, and answers from BM25 alone when it fails."""
        ...

    @property
    def embeddings(self) -> np.ndarray:
        """Item embeddings [items, dim], row-indexable (MMR/DPP read the candidates' rows)."""
        ...

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Row ids of the k nearest items, best first; only rows where `allowed` (a boolean mask) is True."""
        ...

    def similarities(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact cosine between the query and the given rows."""
        ...

    def close(self) -> None:
        """Let go of outside resources (a vector engine client); the index is not searched afterwards."""
        ...


# HNSW search breadth (at least k is used): on Home Depot's 55k titles, 128 with 100 candidates per
# retriever gives the same Recall@100 as 256 (0.805) and NDCG@10 within 0.0002 of 512 with 400
# (docs/performance.md).
EF_SEARCH = 128
# A filter that leaves at most this many rows is searched exactly over them: an HNSW walk with a selective
# filter finds only some of the allowed items, or none (5 of 30,000 allowed: nothing in a quarter of queries).
# 4,096 × 384 dims is a few tenths of a millisecond.
EXACT_FILTER_ROWS = 4096


class _IndexMemory:
    """Float32 rows in memory a FAISS index owns, exposed to numpy (__array_interface__, read-only). An array
    made from it has this object as its base, and this object holds the index: the memory outlives every
    array over it."""

    def __init__(self, index: faiss.Index, address: int, shape: tuple[int, int]) -> None:
        self.index = index
        self.__array_interface__ = {"data": (address, True), "shape": shape, "typestr": "<f4", "version": 3}


def stored_vectors(index: faiss.Index) -> np.ndarray | None:
    """A read-only view [ntotal, d] of the float32 vectors a flat or HNSW-flat index stores, else None.
    The view shares the index's memory and keeps the index alive."""
    flat = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    if not isinstance(flat, faiss.IndexFlat) or flat.ntotal == 0:
        return None
    address = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).__array_interface__["data"][0]
    return np.asarray(_IndexMemory(index, address, (flat.ntotal, flat.d)))


class DenseIndex:
    """Inner-product ANN over L2-normalised item embeddings (FAISS HNSW, or exact for small catalogs)."""

    def __init__(self, index: faiss.Index, embeddings: np.ndarray, ef_search: int) -> None:
        self._index = index
        self.embeddings = embeddings
        self.ef_search = ef_search

    @property
    def num_items(self) -> int:
        return int(self._index.ntotal)

    @property
    def remote(self) -> bool:
        return False  # in this process's memory: searched on the event loop (a thread hop costs what it saves)

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        *,
        hnsw_threshold: int = 20_000,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = EF_SEARCH,
        on_added: Callable[[int], object] | None = None,
    ) -> DenseIndex:
        """Exact search below `hnsw_threshold` items (it is faster there), HNSW above. `on_added(n)` is
        told of every n vectors added (a progress bar: an HNSW build over 1M items takes minutes)."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        dim = vectors.shape[1]
        if len(vectors) < hnsw_threshold:
            index: faiss.Index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
        step = len(vectors) if on_added is None else 50_000
        for start in range(0, len(vectors), max(step, 1)):
            chunk = vectors[start : start + step]
            index.add(chunk)
            if on_added is not None:
                on_added(len(chunk))
        return cls(index, vectors, ef_search)

    def save(self, index_path: Path, embeddings_path: Path) -> None:
        faiss.write_index(self._index, str(index_path))
        np.save(embeddings_path, self.embeddings)

    @classmethod
    def load(
        cls, index_path: Path, embeddings_path: Path, *, ef_search: int = EF_SEARCH, mapped: bool = True
    ) -> DenseIndex:
        """The saved index; rows are read from the index's own vectors when it keeps them (flat storage),
        so they are in memory once and a candidate gather is a plain array read, not a memmap's.

        `mapped`: the index file is mapped, not copied (its vectors and HNSW graph are used in place, see
        ranker.mapped), so that processes serving the same release share it."""
        if mapped:
            index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP_IFC)
            populate(index_path)
        else:
            index = faiss.read_index(str(index_path))
        embeddings = stored_vectors(index)
        if embeddings is None:
            embeddings = np.load(embeddings_path, mmap_mode="r")
        return cls(index, embeddings, ef_search)

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Row ids of the k nearest items, best first; `allowed` is an optional boolean row mask."""
        k = min(k, self.num_items)
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        if isinstance(self._index, faiss.IndexHNSW):
            params: faiss.SearchParameters = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, k)
        else:
            params = faiss.SearchParameters()
        allowed_count = self.num_items
        if allowed is not None:
            allowed_count = int(np.count_nonzero(allowed))
            if isinstance(self._index, faiss.IndexHNSW) and allowed_count <= EXACT_FILTER_ROWS:
                return self._exact(query, k, np.flatnonzero(allowed))
            selector = faiss.IDSelectorBitmap(np.packbits(allowed, bitorder="little"))
            params.sel = selector
        _, ids = self._index.search(query.reshape(1, -1).astype(np.float32), k, params=params)
        row = ids[0]
        found = row[row >= 0]
        if allowed is not None and len(found) < min(k, allowed_count):
            # the graph walk lost allowed items a filter left behind: look at every one of them
            return self._exact(query, k, np.flatnonzero(allowed))
        return found

    def _exact(self, query: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
        """The k of `rows` nearest the query by exact inner product, best first, ties by row."""
        return best_rows(rows.astype(np.int64), self.similarities(query, rows), k)[0]

    def similarities(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact cosine between the query and the given items."""
        return np.asarray(self.embeddings[rows] @ query.astype(np.float32), dtype=np.float32)

    def close(self) -> None:
        """Nothing to let go of: the index lives in this process's memory."""


def best_rows(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k of `rows` with the highest `scores` (aligned with rows), best first, ties by row id; with
    their scores."""
    if len(rows) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        rows, scores = rows[part], scores[part]
    order = np.lexsort((rows, -scores))
    return rows[order], scores[order]


def top_rows(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Rows of the k highest positive scores, best first, ties by row id."""
    candidates = np.flatnonzero(scores > 0) if allowed is None else np.flatnonzero((scores > 0) & allowed)
    return best_rows(candidates, scores[candidates], k)[0]


def union_rows(*ranked: np.ndarray) -> np.ndarray:
    """Rows in order of first appearance across the ranked lists (dense first, then lexical...)."""
    if not ranked:
        return np.zeros(0, dtype=np.int64)
    stacked = np.concatenate([np.asarray(r, dtype=np.int64) for r in ranked])
    _, first = np.unique(stacked, return_index=True)
    return stacked[np.sort(first)]


def reciprocal_rank_fusion(rows: np.ndarray, ranked_lists: Sequence[np.ndarray], k: float = 60.0) -> np.ndarray:
    """RRF score of each of `rows` over the ranked lists (a row absent from a list gets nothing from it)."""
    rows = np.asarray(rows, dtype=np.int64)
    fused = np.zeros(len(rows), dtype=np.float64)
    if len(rows) == 0:
        return fused
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    for ranked in ranked_lists:
        ranked = np.asarray(ranked, dtype=np.int64)
        at = np.clip(np.searchsorted(sorted_rows, ranked), 0, len(rows) - 1)
        hit = sorted_rows[at] == ranked
        np.add.at(fused, order[at[hit]], 1.0 / (k + np.flatnonzero(hit) + 1))
    return fused


class Candidates:
    """One query's candidate rows with the retrieval signals the features and fallbacks need."""

    __slots__ = ("bm25", "dense", "dense_ranked", "lexical_ranked", "rows")

    def __init__(
        self,
        rows: np.ndarray,
        dense: np.ndarray,
        bm25: np.ndarray,
        dense_ranked: np.ndarray,
        lexical_ranked: np.ndarray,
    ) -> None:
        self.rows = rows  # item rows, dense hits first, then lexical-only hits
        self.dense = dense  # cosine per row (0 when no query embedding)
        self.bm25 = bm25  # BM25 per row
        self.dense_ranked = dense_ranked  # the ANN's ranked list
        self.lexical_ranked = lexical_ranked  # BM25's ranked list

    def fused(self) -> np.ndarray:
        """Reciprocal-rank fusion of the two lists: the order used when the ranker is unavailable."""
        return reciprocal_rank_fusion(self.rows, [self.dense_ranked, self.lexical_ranked])


@dataclass(frozen=True)
class LexicalHits:
    """BM25 for one query: every row's score and the top rows, best first."""

    scores: np.ndarray
    ranked: np.ndarray


class HybridRetriever:
    """Union of the dense ANN's and BM25's top hits, with exact signals for every candidate."""

    def __init__(self, dense: DenseRetriever, lexical: LexicalRetriever) -> None:
        self.dense = dense
        self.lexical = lexical

    def lexical_hits(self, query_tokens: Sequence[str], k: int, allowed: np.ndarray | None = None) -> LexicalHits:
        """The lexical half of retrieve(): it needs no query embedding, so it can run while one is computed."""
        scores = self.lexical.scores(query_tokens)
        return LexicalHits(scores, top_rows(scores, k, allowed))

    def retrieve(
        self,
        query_tokens: Sequence[str],
        query_embedding: np.ndarray | None,
        *,
        dense_k: int,
        lexical_k: int,
        allowed: np.ndarray | None = None,
        include: np.ndarray | None = None,
        lexical: LexicalHits | None = None,
        dense_ranked: np.ndarray | None = None,
    ) -> Candidates:
        """Candidates for a query; `include` rows (e.g. pinned items) join them whether retrieved or not.
        `lexical`: lexical_hits(query_tokens, lexical_k, allowed), `dense_ranked`: dense.search(query_embedding,
        dense_k, allowed), when already computed."""
        if lexical is None:
            lexical = self.lexical_hits(query_tokens, lexical_k, allowed)
        bm25_all, lexical_ranked = lexical.scores, lexical.ranked
        if dense_ranked is None and query_embedding is not None:
            dense_ranked = self.dense.search(query_embedding, dense_k, allowed)
        elif dense_ranked is None:
            dense_ranked = np.zeros(0, dtype=np.int64)
        extra = np.zeros(0, dtype=np.int64) if include is None else np.asarray(include, dtype=np.int64)
        rows = union_rows(dense_ranked, lexical_ranked, extra)
        return self.signals(rows, query_embedding, bm25_all, dense_ranked, lexical_ranked)

    def signals(
        self,
        rows: np.ndarray,
        query_embedding: np.ndarray | None,
        bm25_all: np.ndarray,
        dense_ranked: np.ndarray | None = None,
        lexical_ranked: np.ndarray | None = None,
    ) -> Candidates:
        """Candidates for given rows (the rerank path passes the caller's items here)."""
        rows = np.asarray(rows, dtype=np.int64)
        dense = (
            self.dense.similarities(query_embedding, rows)
            if query_embedding is not None
            else np.zeros(len(rows), dtype=np.float32)
        )
        bm25 = bm25_all[rows]
        # Without retrieval lists (rerank path), each signal's own order over the given rows, ties by row:
        # the caller's order of the items does not matter.
        if dense_ranked is None:
            dense_ranked = rows[np.lexsort((rows, -dense))] if query_embedding is not None else rows[:0]
        if lexical_ranked is None:
            lexical_ranked = rows[np.lexsort((rows, -bm25))]
        return Candidates(rows, dense, bm25, dense_ranked, lexical_ranked)
