"""Load a shop's catalog and relevance judgments into polars frames, and split queries train/dev.

Catalog (CSV or parquet), one row per item:

    item_id   (alias: product_uid)    required; read as text, so "00123" stays "00123"
    title     (alias: product_title)  required; must be non-empty after stripping whitespace
    category, brand                   optional text
    price                             optional number (empty -> null)

Rows with a repeated item_id are dropped (the first one wins). The result has exactly the
columns and types of ranker.release.ITEM_SCHEMA; its row order becomes the index row ids.

Judgments (CSV or parquet), one row per judged (query, item) pair:

    query      (alias: search_term)   the query text as users typed it
    item_id    (alias: product_uid)
    relevance                         graded 1 (irrelevant) .. 3 (exact); fractions allowed

Home Depot's Kaggle files use the aliases and are read as-is (CSV bytes that are not valid UTF-8
are replaced rather than failing). A pair judged twice keeps the mean relevance.

Train/dev split: by query, never by row, so no query is seen in both. A query goes to dev when
sha256("<seed>:<normalised query>") read as an integer is below DEV_FRACTION of the range,
where the normalised query is lower-cased with runs of whitespace collapsed. The split depends
only on the query text and the seed: adding judgments never moves an existing query.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ranker.release import ITEM_SCHEMA, NUMERIC_ATTRIBUTES

DEV_FRACTION = 0.2
_BOOLEANS = {"true": True, "1": True, "yes": True, "y": True, "false": False, "0": False, "no": False, "n": False}
_EXPECTED = {
    **{c: "a number" for c in NUMERIC_ATTRIBUTES},
    "in_stock": "true/false, 1/0 or yes/no",
    "created_at": "a YYYY-MM-DD date",
}

_CATALOG_ALIASES = {"product_uid": "item_id", "product_title": "title"}
_JUDGMENT_ALIASES = {"search_term": "query", "product_uid": "item_id"}
_SPACES = re.compile(r"\s+")


class DataError(ValueError):
    """The input file does not have the expected columns or values."""


def _read_table(path: Path) -> pl.DataFrame:
    """Every column as text: ids keep leading zeros, and types are decided here, not guessed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if path.suffix == ".parquet":
        frame = pl.read_parquet(path)
        return frame.with_columns(pl.all().cast(pl.Utf8))
    return pl.read_csv(path, infer_schema=False, encoding="utf8-lossy")


def _rename_aliases(frame: pl.DataFrame, aliases: dict[str, str], path: Path) -> pl.DataFrame:
    renames = {}
    for alias, name in aliases.items():
        if alias in frame.columns:
            if name in frame.columns:
                raise DataError(f"{path} has both {alias!r} and {name!r}; keep one")
            renames[alias] = name
    return frame.rename(renames)


def _require(frame: pl.DataFrame, columns: list[str], path: Path, aliases: dict[str, str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        hint = ", ".join(f"{a} -> {n}" for a, n in aliases.items())
        raise DataError(f"{path} lacks column(s) {missing} (has {frame.columns}; accepted aliases: {hint})")


def load_catalog(path: Path, *, limit: int | None = None) -> pl.DataFrame:
    """Items in ITEM_SCHEMA, deduplicated by item_id; `limit` keeps only the first rows read."""
    path = Path(path)
    frame = _rename_aliases(_read_table(path), _CATALOG_ALIASES, path)
    _require(frame, ["item_id", "title"], path, _CATALOG_ALIASES)
    if limit is not None:
        frame = frame.head(limit)
    for column in ITEM_SCHEMA:
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Utf8).alias(column))
    frame = frame.with_columns(
        pl.col(c).str.strip_chars().replace("", None) for c in ITEM_SCHEMA if c not in ("item_id", "title")
    ).with_columns(pl.col("item_id").str.strip_chars(), pl.col("title").str.strip_chars())
    empty_ids = frame.filter(pl.col("item_id").is_null() | (pl.col("item_id") == "")).height
    if empty_ids:
        raise DataError(f"{path}: {empty_ids} row(s) have an empty item_id")
    empty_titles = frame.filter(pl.col("title").is_null() | (pl.col("title") == "")).height
    if empty_titles:
        raise DataError(f"{path}: {empty_titles} row(s) have an empty title")
    parsed = {
        **{c: pl.col(c).cast(pl.Float64, strict=False) for c in NUMERIC_ATTRIBUTES},
        "in_stock": pl.col("in_stock")
        .str.to_lowercase()
        .replace_strict(_BOOLEANS, default=None, return_dtype=pl.Boolean),
        "created_at": pl.col("created_at").str.slice(0, 10).str.to_date("%Y-%m-%d", strict=False),
    }
    for column, expression in parsed.items():
        bad = frame.filter(pl.col(column).is_not_null() & expression.is_null()).height
        if bad:
            raise DataError(f"{path}: {bad} row(s) have a {column} that is not {_EXPECTED[column]}")
    frame = frame.with_columns(expression.alias(column) for column, expression in parsed.items())
    frame = frame.unique(subset="item_id", keep="first", maintain_order=True)
    return frame.select([pl.col(name).cast(dtype) for name, dtype in ITEM_SCHEMA.items()])


RELEVANCE_RANGE = (1.0, 3.0)  # the graded scale offline.metrics reads: gain = relevance - 1, relevant from 2


def load_judgments(path: Path) -> pl.DataFrame:
    """query (Utf8), item_id (Utf8), relevance (Float64); one row per distinct (query, item)."""
    path = Path(path)
    frame = _rename_aliases(_read_table(path), _JUDGMENT_ALIASES, path)
    _require(frame, ["query", "item_id", "relevance"], path, _JUDGMENT_ALIASES)
    frame = frame.select(
        pl.col("query").str.strip_chars(),
        pl.col("item_id").str.strip_chars(),
        pl.col("relevance").str.strip_chars().cast(pl.Float64, strict=False),
    )
    bad = frame.filter(pl.col("relevance").is_null()).height
    if bad:
        raise DataError(f"{path}: {bad} row(s) have a relevance that is not a number")
    low, high = RELEVANCE_RANGE
    bad = frame.filter(~pl.col("relevance").is_between(low, high)).height  # NaN and ±inf fail too
    if bad:
        raise DataError(f"{path}: {bad} row(s) have a relevance outside {low:g}..{high:g}")
    frame = frame.filter(pl.col("query").is_not_null() & (pl.col("query") != ""))
    return frame.group_by(["query", "item_id"], maintain_order=True).agg(pl.col("relevance").mean())


def normalise_query(query: str) -> str:
    return _SPACES.sub(" ", query.strip().lower())


def is_dev_query(query: str, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{normalise_query(query)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < DEV_FRACTION * 2**64


@dataclass(frozen=True, kw_only=True)
class Split:
    train: pl.DataFrame
    dev: pl.DataFrame

    @property
    def train_queries(self) -> int:
        return self.train["query"].n_unique()

    @property
    def dev_queries(self) -> int:
        return self.dev["query"].n_unique()


def split_queries(judgments: pl.DataFrame, seed: int) -> Split:
    """Query-level train/dev split (see the module docstring); deterministic in (query, seed)."""
    queries = judgments.select(pl.col("query").unique(maintain_order=True))
    flags = queries.with_columns(
        pl.col("query").map_elements(lambda q: is_dev_query(q, seed), return_dtype=pl.Boolean).alias("dev")
    )
    tagged = judgments.join(flags, on="query", how="left")
    return Split(
        train=tagged.filter(~pl.col("dev")).drop("dev"),
        dev=tagged.filter(pl.col("dev")).drop("dev"),
    )


def judgments_by_query(judgments: pl.DataFrame) -> dict[str, dict[str, float]]:
    """{query: {item_id: relevance}}, queries in first-seen order."""
    grouped: dict[str, dict[str, float]] = {}
    for query, item_id, relevance in judgments.select(["query", "item_id", "relevance"]).iter_rows():
        grouped.setdefault(query, {})[item_id] = relevance
    return grouped
