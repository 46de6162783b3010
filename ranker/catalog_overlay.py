"""The release's catalog plus online updates, as immutable snapshots: columns, ANN and BM25 over appended rows.

Row ids only grow. An upsert appends a row (the old row of a replaced item turns dead); a delete marks
the item's row dead. `Catalog.mask` leaves dead rows out of every Rank, so the ANN (through its
IDSelectorBitmap), BM25, candidate_ids, pins and filters never see them, and the overlay indexes
drop them too. A snapshot is never modified: `apply` builds the next one, which the caller swaps
in, so a Rank that took a snapshot keeps seeing exactly that catalog, with valid row ids.

- Dense: the release's index (FAISS flat/HNSW, or any DenseRetriever) is left as it is; appended
  rows are searched exactly and the two ranked lists are merged by score.
- Lexical: bm25s indexes are static, so appended rows are scored with the release index's own BM25
  variant, k1, b, document count, average length and document frequencies (a term the release has
  never seen counts the live appended rows that contain it). An appended copy of a release item
  gets the very score the release gives that item.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date

import numpy as np

from ranker.domain import CatalogItem
from ranker.release import NUMERIC_ATTRIBUTES, Catalog, Release
from ranker.retrieval import Analyzer, BM25Parameters, DenseRetriever, HybridRetriever, LexicalIndex, best_rows

FRESHNESS = "freshness"
# Growth of the shared embedding buffer beyond what a batch needs: amortises the copy of all rows.
MIN_SPARE_ROWS = 1024
SPARE_FRACTION = 8  # 1/8 of the rows


class RowStore:
    """Append-only float32 rows shared by successive snapshots.

    A snapshot of n rows only ever reads rows[:n], so the next batch may write rows n.. in place
    (when there is room and nobody has written there yet) without changing what earlier snapshots
    see; otherwise the rows are copied into a larger buffer.
    """

    def __init__(self, data: np.ndarray, filled: int) -> None:
        self.data = data
        self.filled = filled  # rows [filled:] are free

    def append(self, used: int, rows: np.ndarray) -> tuple[RowStore, np.ndarray]:
        """The store holding data[:used] followed by `rows`, and a view of exactly those rows."""
        need = used + len(rows)
        if used == self.filled and self.data.flags.writeable and len(self.data) >= need:
            self.data[used:need] = rows
            self.filled = need
            return self, self.data[:need]
        capacity = need + max(MIN_SPARE_ROWS, need // SPARE_FRACTION)
        data = np.empty((capacity, self.data.shape[1]), dtype=np.float32)
        data[:used] = self.data[:used]
        data[used:need] = rows
        store = RowStore(data, need)
        return store, data[:need]


@dataclass(frozen=True, kw_only=True)
class BM25Statistics:
    """The collection statistics of the release's BM25 index, used to score appended rows alike."""

    parameters: BM25Parameters
    documents: int
    average_length: float

    @classmethod
    def of(cls, lexical: LexicalIndex, title_terms: np.ndarray) -> BM25Statistics:
        """`title_terms`: the number of analysed terms of each of the index's titles (TitleIndex.title_terms)."""
        parameters = lexical.parameters()
        if parameters.method not in _TFC or parameters.idf_method not in _IDF:
            raise ValueError(f"BM25 variant {parameters.method}/{parameters.idf_method} cannot take online updates")
        # LexicalIndex.build indexes an empty title as one placeholder token.
        lengths = np.maximum(np.asarray(title_terms, dtype=np.float64), 1.0)
        return cls(parameters=parameters, documents=len(lengths), average_length=float(lengths.mean()))

    def idf(self, df: int) -> float:
        return _IDF[self.parameters.idf_method](df, self.documents)

    def term_scores(self, idf: float, tf: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        p = self.parameters
        norm = p.k1 * ((1.0 - p.b) + p.b * lengths / self.average_length)
        return np.asarray(idf * _TFC[p.method](tf, norm, p.k1), dtype=np.float32)


# bm25s's formulas (bm25s.scoring), for the variants without a non-occurrence term.
_IDF = {
    "lucene": lambda df, n: math.log(1 + (n - df + 0.5) / (df + 0.5)),
    "robertson": lambda df, n: math.log(max((n - df + 0.5) / (df + 0.5), 1.0)),
    "atire": lambda df, n: math.log(n / df),
}
_TFC = {
    "lucene": lambda tf, norm, k1: tf / (norm + tf),
    "robertson": lambda tf, norm, k1: tf / (norm + tf),
    "atire": lambda tf, norm, k1: tf * (k1 + 1) / (norm + tf),
}


@dataclass(frozen=True)
class Posting:
    rows: np.ndarray  # int64, appended rows containing the term
    tf: np.ndarray  # float64, the term's count in each
    base_df: int  # documents of the release containing it (0: a term new to the catalog)


class OverlayLexical:
    """LexicalRetriever: the release's BM25 index, then the appended rows scored with its statistics."""

    def __init__(
        self,
        base: LexicalIndex,
        stats: BM25Statistics,
        postings: dict[str, Posting],
        lengths: np.ndarray,
        dead: np.ndarray,
    ) -> None:
        self.base = base
        self.stats = stats
        self.postings = postings
        self.lengths = lengths  # analysed length of each appended row
        self.dead = dead

    @property
    def num_items(self) -> int:
        return self.base.num_items + len(self.lengths)

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        offset = self.base.num_items
        delta = np.zeros(len(self.lengths), dtype=np.float32)
        for term in query_tokens:  # a repeated query term counts again, as in bm25s
            posting = self.postings.get(term)
            if posting is None:
                continue
            df = posting.base_df or int(np.count_nonzero(~self.dead[posting.rows]))
            if df == 0:
                continue
            local = posting.rows - offset
            delta[local] += self.stats.term_scores(self.stats.idf(df), posting.tf, self.lengths[local])
        out = np.concatenate([self.base.scores(query_tokens), delta])
        out[self.dead] = 0.0
        return out

    def appended(self, row0: int, tokens: Sequence[Sequence[str]], dead: np.ndarray) -> OverlayLexical:
        """This index plus rows row0.. with the given analysed titles (copy-on-write)."""
        postings = dict(self.postings)
        new: dict[str, tuple[list[int], list[int]]] = {}
        for i, doc in enumerate(tokens):
            for term, count in Counter(doc).items():
                rows, tfs = new.setdefault(term, ([], []))
                rows.append(row0 + i)
                tfs.append(count)
        for term in sorted(new):
            rows, tfs = new[term]
            old = postings.get(term)
            base_df = old.base_df if old is not None else self.base.document_frequency(term)
            add_rows, add_tf = np.array(rows, dtype=np.int64), np.array(tfs, dtype=np.float64)
            if old is not None:
                add_rows, add_tf = np.concatenate([old.rows, add_rows]), np.concatenate([old.tf, add_tf])
            postings[term] = Posting(add_rows, add_tf, base_df)
        lengths = np.concatenate([self.lengths, np.array([len(t) for t in tokens], dtype=np.float64)])
        return OverlayLexical(self.base, self.stats, postings, lengths, dead)


class OverlayDense:
    """DenseRetriever: the release's ANN over its rows, exact search over appended rows, merged by score."""

    def __init__(self, base: DenseRetriever, embeddings: np.ndarray, dead: np.ndarray) -> None:
        self.base = base
        self._embeddings = embeddings  # every row: the release's, then the appended ones
        self.dead = dead

    @property
    def num_items(self) -> int:
        return len(self._embeddings)

    @property
    def remote(self) -> bool:
        return self.base.remote

    @property
    def embeddings(self) -> np.ndarray:
        return self._embeddings

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        n_base = self.base.num_items
        keep = ~self.dead if allowed is None else allowed & ~self.dead
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        base_keep = keep[:n_base]
        base_rows = np.asarray(self.base.search(q, k, None if base_keep.all() else base_keep), dtype=np.int64)
        live = np.flatnonzero(keep[n_base:])
        if len(live) == 0 or k <= 0:
            return base_rows
        # One product over the contiguous appended rows (no gather), then the live ones.
        delta_rows = n_base + live
        delta_scores = np.asarray(self._embeddings[n_base:] @ q, dtype=np.float32)[live]
        delta_rows, delta_scores = best_rows(delta_rows, delta_scores, k)
        # Merge keys: the ANN's list keeps its own order exactly (a running minimum of its exact scores),
        # an appended row goes before the first release row it beats, and after it on a tie.
        base_keys = np.minimum.accumulate(self.similarities(q, base_rows)) if len(base_rows) else np.zeros(0)
        rows = np.concatenate([base_rows, delta_rows])
        keys = np.concatenate([base_keys, delta_scores]).astype(np.float64)
        source = np.concatenate([np.zeros(len(base_rows)), np.ones(len(delta_rows))])
        position = np.arange(len(rows))
        merged = rows[np.lexsort((position, source, -keys))]
        return merged[:k]

    def similarities(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self._embeddings[rows] @ np.asarray(query, dtype=np.float32), dtype=np.float32)

    def close(self) -> None:
        """Nothing: the base index belongs to its Release, which closes it."""


@dataclass(frozen=True, kw_only=True)
class Applied:
    """What a batch changed."""

    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    not_found: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class CatalogSnapshot:
    """One immutable version of the live catalog; `release` is what Rank reads."""

    base: Release  # the release as loaded from disk
    release: Release  # the base with the merged catalog and the overlay indexes
    lexical: OverlayLexical  # BM25 over the appended rows (none yet in the first snapshot)
    store: RowStore | None  # every row's embedding; None until a row is appended
    as_of: date  # the day item ages ("freshness") are counted from

    @classmethod
    def of(cls, base: Release, *, as_of: date | None = None) -> CatalogSnapshot:
        """The release without changes: Rank reads the very objects Release.load built."""
        lexical = base.retriever.lexical
        if not isinstance(lexical, LexicalIndex):
            raise TypeError(f"online catalog updates need a LexicalIndex, got {type(lexical).__name__}")
        stats = BM25Statistics.of(lexical, base.catalog.text.title_terms)
        no_rows = np.zeros(0, dtype=np.float64)
        overlay = OverlayLexical(lexical, stats, {}, no_rows, np.zeros(len(base.catalog), dtype=bool))
        return cls(base=base, release=base, lexical=overlay, store=None, as_of=as_of or date.today())

    @property
    def catalog(self) -> Catalog:
        return self.release.catalog

    @property
    def appended(self) -> int:
        """Rows added online (live or dead)."""
        return len(self.catalog) - len(self.base.catalog)

    @property
    def live_items(self) -> int:
        dead = self.catalog.dead
        return len(self.catalog) - (int(dead.sum()) if dead is not None else 0)

    def apply(
        self,
        upserts: Sequence[tuple[CatalogItem, np.ndarray]],
        deletes: Sequence[str] = (),
        analyzer: Analyzer | None = None,
    ) -> tuple[CatalogSnapshot, Applied]:
        """The next snapshot: `deletes` removed, then `upserts` (item, embedding) appended; self is unchanged.

        `analyzer` analyses the new titles (default: the release's; pass another when not on the thread
        that serves Rank, its stemmer is not thread-safe)."""
        catalog = self.catalog
        n = len(catalog)
        dead = np.zeros(n + len(upserts), dtype=bool)
        if catalog.dead is not None:
            dead[:n] = catalog.dead
        deleted, not_found = 0, []
        for item_id in deletes:
            row = catalog.row_of.get(item_id)
            if row is None or dead[row]:
                not_found.append(item_id)
                continue
            dead[row] = True
            deleted += 1
        row_of = dict(catalog.row_of) if upserts else catalog.row_of
        inserted = updated = 0
        moves: dict[int, int] = {}  # old row -> new row of items given again
        for i, (item, _) in enumerate(upserts):
            old = row_of.get(item.item_id)
            if old is not None and not dead[old]:
                dead[old] = True
                updated += 1
            else:
                inserted += 1
            if old is not None:
                moves[old] = n + i
            row_of[item.item_id] = n + i
        items = [item for item, _ in upserts]
        tokens = (analyzer or self.base.analyzer).analyze_many(item.title for item in items)
        grown = _with_rows(catalog, items, tokens, self.as_of) if items else catalog
        merged = replace(grown, dead=dead, row_of=row_of)
        store, embeddings = self._embeddings(upserts, n)
        lexical = self.lexical.appended(n, tokens, dead)
        retriever = HybridRetriever(OverlayDense(self.base.retriever.dense, embeddings, dead), lexical)
        neighbours = self.release.neighbours
        if neighbours is not None and moves:
            # The artifact is keyed by item id: an updated item keeps its interactions and neighbours.
            neighbours = neighbours.moved(moves, len(merged))
        release = replace(self.release, catalog=merged, retriever=retriever, neighbours=neighbours)
        applied = Applied(inserted=inserted, updated=updated, deleted=deleted, not_found=tuple(not_found))
        return replace(self, release=release, lexical=lexical, store=store), applied

    def with_tombstones(self, item_ids: Iterable[str]) -> CatalogSnapshot:
        """The snapshot with `item_ids` known as deleted where they have no row (Catalog.tombstones)."""
        catalog = self.catalog
        new = frozenset(item_ids) - catalog.row_of.keys() - catalog.tombstones
        if not new:
            return self
        release = replace(self.release, catalog=replace(catalog, tombstones=catalog.tombstones | new))
        return replace(self, release=release)

    def _embeddings(
        self, upserts: Sequence[tuple[CatalogItem, np.ndarray]], n: int
    ) -> tuple[RowStore | None, np.ndarray]:
        if not upserts:  # nothing to add: keep the rows (and the release's own array) as they are
            return self.store, self.release.retriever.dense.embeddings
        dim = self.base.manifest.embedding_dim
        vectors = np.array([e for _, e in upserts], dtype=np.float32).reshape(len(upserts), dim)
        store = self.store or RowStore(np.asarray(self.base.retriever.dense.embeddings), len(self.base.catalog))
        return store.append(n, vectors)


def _with_rows(catalog: Catalog, items: Sequence[CatalogItem], tokens: list[list[str]], as_of: date) -> Catalog:
    """`catalog` with one row per item appended to every per-row column (Catalog.from_frame's conventions)."""
    n = len(catalog)
    values = {name: [getattr(item, name) for item in items] for name in NUMERIC_ATTRIBUTES}
    values[FRESHNESS] = [None if item.created_at is None else -float((as_of - item.created_at).days) for item in items]
    signals: dict[str, np.ndarray] = {}
    for name in (*catalog.signals, *(k for k in (*NUMERIC_ATTRIBUTES, FRESHNESS) if k not in catalog.signals)):
        new = values[name]
        if name not in catalog.signals and all(v is None for v in new):
            continue
        base = catalog.signals.get(name, np.full(n, np.nan))
        signals[name] = np.concatenate([base, _floats(new)])
    in_stock = catalog.in_stock
    if in_stock is not None or any(item.in_stock is not None for item in items):
        base_stock = in_stock if in_stock is not None else np.zeros(n, dtype=bool)
        in_stock = np.concatenate([base_stock, np.array([bool(item.in_stock) for item in items], dtype=bool)])
    rows_by_value = {}
    for field, column in (("category", [i.category for i in items]), ("brand", [i.brand for i in items])):
        index = dict(catalog.rows_by_value[field])
        new_rows: dict[str, list[int]] = {}
        for i, value in enumerate(column):
            if value is not None:
                new_rows.setdefault(value, []).append(n + i)
        for value, rows in new_rows.items():
            index[value] = np.concatenate([index.get(value, np.zeros(0, dtype=np.int64)), np.array(rows, np.int64)])
        rows_by_value[field] = index
    return replace(
        catalog,
        item_ids=[*catalog.item_ids, *(item.item_id for item in items)],
        titles=[*catalog.titles, *(item.title for item in items)],
        categories=[*catalog.categories, *(item.category for item in items)],
        brands=[*catalog.brands, *(item.brand for item in items)],
        prices=np.concatenate([catalog.prices, _floats(values["price"])]),
        text=catalog.text.appended([item.title for item in items], tokens),
        signals=signals,
        in_stock=in_stock,
        rows_by_value=rows_by_value,
    )


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
