"""Test doubles behind the same protocols as the real models, and a tiny in-memory release."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import polars as pl

from ranker.catalog_journal import Change, decode_change, encode_change, entries
from ranker.catalog_log import FIRST, Compaction, LogEntry, after, compacted, embedding_dim
from ranker.errors import BackendUnavailable
from ranker.features import FEATURE_NAMES
from ranker.release import Catalog, Manifest, Release
from ranker.retrieval import Analyzer, DenseIndex, HybridRetriever, LexicalIndex

# The stages a search Rank reports in its timings (and as spans, and in the stage histogram), in order.
SEARCH_STAGES = ["lexical", "encode", "retrieve", "features", "score", "blend", "diversify"]

ITEMS = [
    # item_id, title, category, brand, price
    ("d1", "DEWALT 20V MAX cordless drill driver kit", "power tools", "DEWALT", 129.0),
    ("d2", "Makita 18V LXT cordless hammer drill", "power tools", "Makita", 149.0),
    ("d3", "Milwaukee M18 cordless drill driver", "power tools", "Milwaukee", 99.0),
    ("d4", "DEWALT 20V MAX cordless impact driver", "power tools", "DEWALT", 119.0),
    ("b1", "Drill bit set titanium 21 piece", "accessories", "DEWALT", 24.0),
    ("p1", "Behr premium plus interior paint white", "paint", "Behr", 35.0),
    ("p2", "Glidden exterior paint and primer gray", "paint", "Glidden", None),
    ("h1", "Garden hose 50 ft heavy duty", "garden", None, 29.0),
]


def embed(text: str, dim: int = 16) -> np.ndarray:
    """A deterministic bag-of-words embedding: texts sharing words are close.

    Words go to dimensions by CRC32, the same in every process. Python's own str hash is salted per
    process, so with it two texts collided into one vector in about 1 run in 100 ("cordless drill" and
    "garden hose" each filling the same two of 16 dimensions), and tests comparing them flaked."""
    v = np.zeros(dim, dtype=np.float32)
    for word in Analyzer().analyze(text):
        v[zlib.crc32(word.encode()) % dim] += 1.0
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


class FakeEncoder:
    """Encoder protocol over `embed`; decodes ids back to text via the test's lookup."""

    def __init__(self, texts: dict[int, str], fail: bool = False) -> None:
        self.texts = texts
        self.fail = fail
        self.calls = 0

    async def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, timeout: float | None) -> np.ndarray:
        self.calls += 1
        if self.fail:
            raise BackendUnavailable("triton:text_encoder", "connection refused")
        return np.stack([embed(self.texts[int(row[0])]) for row in input_ids])


class FakeScorer:
    """Scorer protocol: a fixed linear model over the named features."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.weights = np.zeros(len(FEATURE_NAMES), dtype=np.float32)
        self.weights[FEATURE_NAMES.index("dense_cosine")] = 1.0
        self.weights[FEATURE_NAMES.index("query_term_coverage")] = 2.0

    async def score(self, features: np.ndarray, *, timeout: float | None) -> np.ndarray:
        if self.fail:
            raise BackendUnavailable("triton:ranker", "model not ready")
        return features @ self.weights


class FakeTokenizer:
    """QueryTokenizer stand-in: one id per distinct text (the same text, the same id), remembered for FakeEncoder."""

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}
        self._ids: dict[str, int] = {}
        self.max_tokens = 4

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = []
        for text in texts:
            key = self._ids.setdefault(text, len(self._ids) + 1)
            self.texts[key] = text
            ids.append([key, 0, 0, 0])
        arr = np.array(ids, dtype=np.int64)
        return arr, (arr > 0).astype(np.int64)


def tiny_release() -> Release:
    frame = pl.DataFrame(ITEMS, schema=["item_id", "title", "category", "brand", "price"], orient="row").with_columns(
        pl.col("price").cast(pl.Float64)
    )
    analyzer = Analyzer()
    catalog = Catalog.from_frame(frame, analyzer)
    embeddings = np.stack([embed(t) for t in catalog.titles])
    retriever = HybridRetriever(DenseIndex.build(embeddings), LexicalIndex.build(analyzer.analyze_many(catalog.titles)))
    manifest = Manifest.from_json(
        {
            "format": 1,
            "release_id": "test-release",
            "created_at": "2026-01-01T00:00:00Z",
            "models": {
                "text_encoder": {"version": 3, "dim": 16, "max_query_tokens": 4},
                "ranker": {"version": 5, "features": list(FEATURE_NAMES)},
            },
            "index": {"items": len(ITEMS)},
        }
    )
    return Release(
        path=Path("/nonexistent"), manifest=manifest, catalog=catalog, retriever=retriever, analyzer=analyzer
    )


class ListLog:
    """CatalogLog over a list, stored encoded as the stream stores it. `before_append` runs first in append(),
    `before_swap` in compact() between reading the log and replacing it."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, str, int]] = []
        self.through: dict[str, str] = {}  # entry id -> `through`, for the entries a compaction wrote
        self.fail = False
        self.before_append: Callable[[], Awaitable[None]] | None = None
        self.before_swap: Callable[[], Awaitable[None]] | None = None
        self._grown = asyncio.Event()
        self._next = 1

    async def append(self, change: Change, *, encoder: str, dim: int) -> str:
        if self.before_append is not None:
            hook, self.before_append = self.before_append, None
            await hook()
        self._check()
        return self._add(change, encoder, dim)

    def _add(self, change: Change, encoder: str, dim: int) -> str:
        entry_id, self._next = f"{self._next}-0", self._next + 1
        self.records.append((entry_id, encode_change(change), encoder, dim))
        self._grown.set()
        self._grown = asyncio.Event()
        return entry_id

    async def compact(self) -> Compaction | None:
        self._check()
        log = await self.read(FIRST)
        if not log:
            return None
        if self.before_swap is not None:
            hook, self.before_swap = self.before_swap, None
            await hook()
        since = await self.read(log[-1].id)  # appended meanwhile: copied after the folded entries
        through = (since or log)[-1].id
        block = compacted(log) + [(e.change, e.encoder, embedding_dim(e.change)) for e in since]
        self.records = []
        for change, encoder, dim in block:
            self.through[self._add(change, encoder, dim)] = through
        return Compaction(
            through=through,
            entries_before=len(log) + len(since),
            entries_after=len(block),
            records_before=entries(e.change for e in log + since),
            records_after=entries(change for change, _, _ in block),
        )

    async def read(self, since: str, *, until: str | None = None) -> list[LogEntry]:
        self._check()
        return [
            LogEntry(i, decode_change(data, dim), encoder, self.through.get(i))
            for i, data, encoder, dim in self.records
            if after(i, since) and (until is None or not after(i, until))
        ]

    async def wait(self, since: str, *, block_s: float) -> list[LogEntry]:
        entries = await self.read(since)
        if not entries:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._grown.wait(), block_s)
            entries = await self.read(since)
        return entries

    async def close(self) -> None:
        pass

    def _check(self) -> None:
        if self.fail:
            raise BackendUnavailable("redis", "cannot reach the server")
