"""A release on disk: its layout, its manifest, and loading it into memory for serving.

    RELEASE/
      manifest.json            what is in the release (see Manifest), with a sha256 per file
      items.parquet            item_id, title, category, brand, price — row order = index row ids
      embeddings.npy           float32 [items, dim], L2-normalised, row-aligned with items.parquet
      dense.faiss              FAISS inner-product index over embeddings.npy
      lexical/                 bm25s index over the analysed titles
      title_index/             optional: ranker.features.TitleIndex of the titles (built at load when absent)
      tokenizer/tokenizer.json the query encoder's tokenizer (Hugging Face `tokenizers` format)
      triton_models/           a Triton model repository: text_encoder/ and ranker/, each with
                               config.pbtxt (GPU), configs/cpu.pbtxt, <version>/model.onnx, model.py
      neighbours.npz           optional: item-to-item neighbours from shoppers' histories (ranker.neighbours)

offline.export writes all of it into a temporary sibling folder and renames it into place, so a
half-written release is never visible under RELEASE.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from ranker.domain import Rule
from ranker.errors import NotFound
from ranker.features import FEATURE_NAMES, TitleIndex
from ranker.neighbours import NEIGHBOURS_FILE, ItemNeighbours
from ranker.policy import DEFAULT, POLICY_FILE, Policy, load_policy
from ranker.retrieval import EF_SEARCH, Analyzer, DenseIndex, DenseRetriever, HybridRetriever, LexicalIndex

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ITEMS = "items.parquet"
EMBEDDINGS = "embeddings.npy"
DENSE_INDEX = "dense.faiss"
LEXICAL_DIR = "lexical"
TITLE_INDEX = "title_index"  # ranker.features.TitleIndex.save; optional (built at load when absent)
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
    "popularity": pl.Float64(),
    "rating": pl.Float64(),
    "margin": pl.Float64(),
    "boost": pl.Float64(),
    "in_stock": pl.Boolean(),
    "created_at": pl.Date(),
}
# Numeric catalog columns that feed blend signals of the same name (ranker.blending.CATALOG_SIGNALS).
NUMERIC_ATTRIBUTES = ("price", "popularity", "rating", "margin", "boost")


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

    @property
    def catalog_log_through(self) -> str | None:
        """The shared catalog log's last entry that the release's catalog includes (offline.export
        --catalog-log-through): its replicas apply only the entries after it. None: every entry."""
        through = (self.raw.get("catalog_log") or {}).get("through")
        return str(through) if through else None


# What Release.load checks against the manifest's sha256s: "models" (the default) the files Triton and the
# tokenizer run, and the policy: megabytes, a fraction of a second; "all" every file, the index and the
# vectors too (about 3 GB at 1M items, seconds of CPU per start or swap); "none" only that each file is there.
VerifyLevel = Literal["none", "models", "all"]
VERIFIED_FOR_MODELS = ("triton_models/", "tokenizer/", "policy.toml")


def verify_files(path: Path, manifest: Manifest, level: VerifyLevel) -> None:
    """NotFound naming the first files that are missing, or whose sha256 differs from the manifest's."""
    files: dict[str, str] = manifest.raw.get("files") or {}
    missing = sorted(name for name in files if not (path / name).is_file())
    if missing:  # e.g. an int8 encoder the CPU config names, gone: the release was damaged after export
        raise NotFound(f"release {manifest.release_id} at {path} lacks files its manifest lists: {_some(missing)}")
    if level == "none":
        return
    checked = sorted(name for name in files if level == "all" or name.startswith(VERIFIED_FOR_MODELS))
    changed = [name for name in checked if sha256_file(path / name) != files[name]]
    if changed:
        raise NotFound(
            f"release {manifest.release_id} at {path} was changed after export: the sha256 of {_some(changed)} "
            "differs from its manifest"
        )


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rows_by_value(values: list[str | None]) -> dict[str, np.ndarray]:
    rows: dict[str, list[int]] = {}
    for row, value in enumerate(values):
        if value is not None:
            rows.setdefault(value, []).append(row)
    return {value: np.array(r, dtype=np.int64) for value, r in rows.items()}


def _shared_strings(values: list[str | None]) -> list[str | None]:
    """The same values with one string object per distinct value: a category or brand repeats over many rows,
    and a list of separate copies takes about 70 MB per million rows."""
    one: dict[str, str] = {}
    return [None if value is None else one.setdefault(value, value) for value in values]


def conform(items: pl.DataFrame) -> pl.DataFrame:
    """Items in exactly ITEM_SCHEMA: absent optional columns become nulls (older releases lack some)."""
    absent = [pl.lit(None, dtype=t).alias(n) for n, t in ITEM_SCHEMA.items() if n not in items.columns]
    return items.with_columns(absent).select([pl.col(n).cast(t) for n, t in ITEM_SCHEMA.items()])


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise NotFound(f"no release at {directory}: {MANIFEST} is missing")
    return Manifest.from_json(json.loads(path.read_text()))


@dataclass(frozen=True)
class KnownIds:
    """Membership in the ids a request may name (Catalog.known_ids); a deleted one is known and ranks nowhere."""

    row_of: Mapping[str, int]
    tombstones: frozenset[str]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.row_of or item_id in self.tombstones


@dataclass(frozen=True, kw_only=True)
class Catalog:
    """Item attributes as columns, indexed by row id."""

    item_ids: list[str]
    titles: list[str]
    categories: list[str | None]
    brands: list[str | None]
    prices: np.ndarray  # float64, NaN where unknown
    text: TitleIndex  # the titles' terms, bigrams, trigrams and numbers for the ranker's match features
    row_of: dict[str, int]  # id -> its newest row; ids deleted online stay (their row is dead)
    signals: dict[str, np.ndarray]  # catalog blend signals present in the catalog, NaN where unknown
    in_stock: np.ndarray | None  # bool; None when the catalog has no stock column
    rows_by_value: dict[str, dict[str, np.ndarray]]  # "category"/"brand" -> value -> rows
    # Rows removed online (deleted, or replaced by a newer row of the same id: ranker.catalog_overlay);
    # mask() leaves them out, so they are never retrieved, reranked or pinned. None: no row removed.
    dead: np.ndarray | None = None
    # Ids deleted online that have no row here: an item created online and then deleted (the journal's
    # folding keeps only the delete), or one this release does not carry. Known, like a dead row's id.
    tombstones: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_frame(
        cls, items: pl.DataFrame, analyzer: Analyzer, *, today: date | None = None, text: TitleIndex | None = None
    ) -> Catalog:
        """The catalog's columns; `text`: the titles' TitleIndex when already built (a release's saved one)."""
        items = conform(items)
        titles = items["title"].to_list()
        ids = items["item_id"].to_list()
        if text is None or len(text) != len(titles):
            text = TitleIndex.build(titles, analyzer.analyze_many(titles))
        categories = _shared_strings(items["category"].to_list())
        brands = _shared_strings(items["brand"].to_list())
        signals = {
            name: items[name].fill_null(np.nan).to_numpy().astype(np.float64)
            for name in NUMERIC_ATTRIBUTES
            if items[name].null_count() < items.height
        }
        if items["created_at"].null_count() < items.height:
            age = (pl.lit(today or date.today()) - pl.col("created_at")).dt.total_days()
            days = items.select(age.cast(pl.Float64)).to_series().fill_null(np.nan).to_numpy()
            signals["freshness"] = -days
        stock = items["in_stock"]
        in_stock = stock.fill_null(False).to_numpy().astype(bool) if stock.null_count() < items.height else None
        return cls(
            item_ids=ids,
            titles=titles,
            categories=categories,
            brands=brands,
            prices=items["price"].fill_null(np.nan).to_numpy().astype(np.float64),
            text=text,
            row_of={item_id: row for row, item_id in enumerate(ids)},
            signals=signals,
            in_stock=in_stock,
            rows_by_value={
                "category": _rows_by_value(categories),
                "brand": _rows_by_value(brands),
            },
        )

    @property
    def known_ids(self) -> KnownIds:
        """The ids a request may name: every row's, live or deleted online, and the tombstones."""
        return KnownIds(self.row_of, self.tombstones)

    def rows_of(self, item_ids: Iterable[str]) -> np.ndarray:
        """The rows of the ids that have one, live or deleted online; ids without a row (unknown, or
        tombstones) are skipped."""
        row_of = self.row_of
        return np.array([row_of[i] for i in item_ids if i in row_of], dtype=np.int64)

    def live_row(self, item_id: str) -> int | None:
        """The item's row, or None when the id is unknown or the item was deleted online."""
        row = self.row_of.get(item_id)
        if row is None or (self.dead is not None and self.dead[row]):
            return None
        return row

    def rows_with(self, field: str, values: Iterable[str]) -> np.ndarray:
        """Rows whose category/brand is one of `values`."""
        index = self.rows_by_value[field]
        found = [index[v] for v in values if v in index]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def matches(self, rule: Rule) -> np.ndarray:
        """Boolean row mask of the items a rule names (by id, or by category/brand value)."""
        hit = np.zeros(len(self), dtype=bool)
        hit[self.rows_of(rule.item_ids)] = True
        if rule.field:
            hit[self.rows_with(rule.field, rule.values)] = True
        return hit

    def mask(
        self,
        *,
        categories: frozenset[str],
        min_price: float | None,
        max_price: float | None,
        in_stock_only: bool = False,
        excluded: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """Boolean row mask for the filters, exclusions and removed rows; None when nothing is filtered."""
        unfiltered = not categories and min_price is None and max_price is None and not in_stock_only
        if unfiltered and excluded is None and self.dead is None:
            return None
        allowed = np.ones(len(self), dtype=bool) if excluded is None else ~excluded
        if self.dead is not None:
            allowed &= ~self.dead
        if in_stock_only:
            allowed &= self.in_stock if self.in_stock is not None else False
        if categories:
            in_category = np.zeros(len(self), dtype=bool)
            in_category[self.rows_with("category", categories)] = True
            allowed &= in_category
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
    policy: Policy = DEFAULT
    neighbours: ItemNeighbours | None = None  # item-to-item neighbours for the "personal" signal, if shipped

    @property
    def model_repository(self) -> Path:
        return self.path / MODEL_REPOSITORY

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        ef_search: int = EF_SEARCH,
        policy_override: Path | None = None,
        dense_backend: str = "faiss",
        vector_engine_url: str | None = None,
        verify: VerifyLevel = "models",
        mapped: bool = True,
    ) -> Release:
        """Load a release; the policy is `policy_override`, else the release's policy.toml, else the default.

        The dense retriever is the release's FAISS index, or with `dense_backend="qdrant"` the release's
        collection at `vector_engine_url` (see ranker.vector_engine). Every file the manifest lists must be
        there, and those `verify` names must have the manifest's sha256 (see VerifyLevel). `mapped`: the FAISS
        index, the title index and the BM25 index are mapped read-only rather than copied (ranker.mapped).
        """
        path = Path(path).resolve()
        manifest = read_manifest(path)
        verify_files(path, manifest, verify)
        if manifest.features != FEATURE_NAMES:
            raise NotFound(
                f"release {manifest.release_id} was trained on features {list(manifest.features)}, "
                f"this service computes {list(FEATURE_NAMES)}"
            )
        analyzer = Analyzer()
        items = pl.read_parquet(path / ITEMS)
        catalog = Catalog.from_frame(items, analyzer, text=TitleIndex.load(path / TITLE_INDEX, mapped=mapped))
        dense = load_dense(path, manifest, dense_backend, vector_engine_url, ef_search=ef_search, mapped=mapped)
        try:
            lexical = LexicalIndex.load(path / LEXICAL_DIR, mapped=mapped)
            if not (len(catalog) == dense.num_items == lexical.num_items == manifest.items):
                raise NotFound(
                    f"release {manifest.release_id} is inconsistent: items {len(catalog)}, "
                    f"dense {dense.num_items}, lexical {lexical.num_items}, manifest {manifest.items}"
                )
            policy_file = policy_override or path / POLICY_FILE
            return cls(
                path=path,
                manifest=manifest,
                catalog=catalog,
                retriever=HybridRetriever(dense, lexical),
                analyzer=analyzer,
                policy=load_policy(policy_file) if policy_file.is_file() else DEFAULT,
                neighbours=(
                    ItemNeighbours.load(path / NEIGHBOURS_FILE, catalog.row_of, len(catalog))
                    if (path / NEIGHBOURS_FILE).is_file()
                    else None
                ),
            )
        except BaseException:
            dense.close()  # a vector engine client, or a local engine folder's lock
            raise

    def close(self) -> None:
        """Let go of what the release holds outside this process's memory: its vector engine client."""
        self.retriever.dense.close()


def load_dense(
    path: Path,
    manifest: Manifest,
    backend: str,
    vector_engine_url: str | None,
    *,
    ef_search: int = EF_SEARCH,
    mapped: bool = True,
) -> DenseRetriever:
    """The release's dense retriever: its FAISS index ("faiss"), or its collection in a Qdrant engine ("qdrant")."""
    if backend == "faiss":
        return DenseIndex.load(path / DENSE_INDEX, path / EMBEDDINGS, ef_search=ef_search, mapped=mapped)
    if backend == "qdrant":
        if not vector_engine_url:
            raise ValueError("dense_backend 'qdrant' needs vector_engine_url (RANKER_VECTOR_ENGINE_URL)")
        from ranker import vector_engine  # imported only when chosen: qdrant-client is an optional extra

        embeddings = np.load(path / EMBEDDINGS, mmap_mode="r")
        collection = vector_engine.collection_name(manifest.release_id)
        return vector_engine.open_shared(vector_engine_url, collection, embeddings, ef_search=ef_search)
    raise ValueError(f"dense_backend must be 'faiss' or 'qdrant', got {backend!r}")
