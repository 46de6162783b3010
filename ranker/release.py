"""A release on disk: its layout, its manifest, and loading it into memory for serving.

    RELEASE/
      manifest.json            what is in the release (see Manifest), with a sha256 per file
      items.parquet            item_id, title, category, brand, price — row order = index row ids
      embeddings.npy           float32 [items, dim], L2-normalised, row-aligned with items.parquet
      dense.faiss              FAISS inner-product index over embeddings.npy
      lexical/                 bm25s index over the analysed titles
      tokenizer/tokenizer.json the query encoder's tokenizer (Hugging Face `tokenizers` format)
      triton_models/           a Triton model repository: text_encoder/ and ranker/, each with
                               config.pbtxt (GPU), configs/cpu.pbtxt, <version>/model.onnx, model.py

offline.export writes all of it into a temporary sibling folder and renames it into place, so a
half-written release is never visible under RELEASE.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ranker.errors import NotFound
from ranker.features import FEATURE_NAMES
from ranker.retrieval import Analyzer, DenseIndex, HybridRetriever, LexicalIndex

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEMS = "items.parquet"
EMBEDDINGS = "embeddings.npy"
DENSE_INDEX = "dense.faiss"
LEXICAL_DIR = "lexical"
TOKENIZER = "tokenizer/tokenizer.json"
MODEL_REPOSITORY = "triton_models"
ENCODER_MODEL = "text_encoder"
RANKER_MODEL = "ranker"

ITEM_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.Utf8(),
    "title": pl.Utf8(),
    "category": pl.Utf8(),
    "brand": pl.Utf8(),
    "price": pl.Float64(),
}


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    name: str
    version: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    release_id: str
    created_at: str
    encoder: ModelInfo
    ranker: ModelInfo
    embedding_dim: int
    max_query_tokens: int
    features: tuple[str, ...]
    items: int
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        fmt = data.get("format")
        if fmt != FORMAT_VERSION:
            raise NotFound(f"release format {fmt!r} is not supported (this service reads {FORMAT_VERSION})")
        models = data["models"]
        enc, rnk = models[ENCODER_MODEL], models[RANKER_MODEL]
        return cls(
            release_id=data["release_id"],
            created_at=data["created_at"],
            encoder=ModelInfo(name=ENCODER_MODEL, version=str(enc["version"]), extra=enc),
            ranker=ModelInfo(name=RANKER_MODEL, version=str(rnk["version"]), extra=rnk),
            embedding_dim=int(enc["dim"]),
            max_query_tokens=int(enc["max_query_tokens"]),
            features=tuple(rnk["features"]),
            items=int(data["index"]["items"]),
            raw=data,
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise NotFound(f"no release at {directory}: {MANIFEST} is missing")
    return Manifest.from_json(json.loads(path.read_text()))


@dataclass(frozen=True, kw_only=True)
class Catalog:
    """Item attributes as columns, indexed by row id."""

    item_ids: list[str]
    titles: list[str]
    categories: list[str | None]
    brands: list[str | None]
    prices: np.ndarray  # float64, NaN where unknown
    tokens: list[list[str]]  # analysed titles
    row_of: dict[str, int]

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_frame(cls, items: pl.DataFrame, analyzer: Analyzer) -> Catalog:
        titles = items["title"].to_list()
        ids = items["item_id"].to_list()
        return cls(
            item_ids=ids,
            titles=titles,
            categories=items["category"].to_list(),
            brands=items["brand"].to_list(),
            prices=items["price"].fill_null(np.nan).to_numpy().astype(np.float64),
            tokens=analyzer.analyze_many(titles),
            row_of={item_id: row for row, item_id in enumerate(ids)},
        )

    def mask(
        self, *, categories: frozenset[str], min_price: float | None, max_price: float | None
    ) -> np.ndarray | None:
        """Boolean row mask for the filters; None when nothing is filtered."""
        if not categories and min_price is None and max_price is None:
            return None
        allowed = np.ones(len(self), dtype=bool)
        if categories:
            allowed &= np.fromiter((c in categories for c in self.categories), dtype=bool, count=len(self))
        if min_price is not None:
            allowed &= self.prices >= min_price  # NaN (unknown price) compares False
        if max_price is not None:
            allowed &= self.prices <= max_price
        return allowed


@dataclass(frozen=True, kw_only=True)
class Release:
    """Everything the service holds in memory for one release."""

    path: Path
    manifest: Manifest
    catalog: Catalog
    retriever: HybridRetriever
    analyzer: Analyzer

    @property
    def model_repository(self) -> Path:
        return self.path / MODEL_REPOSITORY

    @classmethod
    def load(cls, path: Path, *, ef_search: int = 512) -> Release:
        path = Path(path).resolve()
        manifest = read_manifest(path)
        if manifest.features != FEATURE_NAMES:
            raise NotFound(
                f"release {manifest.release_id} was trained on features {list(manifest.features)}, "
                f"this service computes {list(FEATURE_NAMES)}"
            )
        analyzer = Analyzer()
        items = pl.read_parquet(path / ITEMS)
        catalog = Catalog.from_frame(items, analyzer)
        dense = DenseIndex.load(path / DENSE_INDEX, path / EMBEDDINGS, ef_search=ef_search)
        lexical = LexicalIndex.load(path / LEXICAL_DIR)
        if not (len(catalog) == dense.num_items == lexical.num_items == manifest.items):
            raise NotFound(
                f"release {manifest.release_id} is inconsistent: items {len(catalog)}, "
                f"dense {dense.num_items}, lexical {lexical.num_items}, manifest {manifest.items}"
            )
        return cls(
            path=path,
            manifest=manifest,
            catalog=catalog,
            retriever=HybridRetriever(dense, lexical),
            analyzer=analyzer,
        )
