"""Shoppers' item sequences from a file, turned into the release's item-to-item neighbours (ranker.neighbours).

The file is CSV or parquet with columns `user_id, item_id` and optionally `timestamp` (any sortable
type): one row per interaction. A user's sequence is their rows by timestamp, else in file order.
Interactions with items outside the catalog are dropped (and counted).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from ranker.neighbours import DEFAULT_TOP_K, DEFAULT_WINDOW, ItemNeighbours


class InteractionsError(ValueError):
    """The interactions file cannot be used."""


def read_sequences(path: Path) -> list[list[str]]:
    frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path, infer_schema_length=0)
    missing = {"user_id", "item_id"} - set(frame.columns)
    if missing:
        raise InteractionsError(f"{path}: missing column(s) {sorted(missing)}; expected user_id, item_id[, timestamp]")
    frame = frame.with_row_index("_order").with_columns(
        pl.col("user_id").cast(pl.Utf8), pl.col("item_id").cast(pl.Utf8)
    )
    keys = ["user_id", "timestamp", "_order"] if "timestamp" in frame.columns else ["user_id", "_order"]
    grouped = frame.sort(keys).group_by("user_id", maintain_order=True).agg(pl.col("item_id"))
    return [list(items) for items in grouped["item_id"].to_list()]


def build_neighbours(
    sequences: list[list[str]],
    row_of: Mapping[str, int],
    num_items: int,
    *,
    window: int = DEFAULT_WINDOW,
    top_k: int = DEFAULT_TOP_K,
) -> tuple[ItemNeighbours, dict[str, Any]]:
    """The neighbours over catalog rows, and what went into them (for the manifest)."""
    rows = [[row_of[i] for i in s if i in row_of] for s in sequences]
    total = sum(len(s) for s in sequences)
    kept = sum(len(r) for r in rows)
    if kept == 0:
        raise InteractionsError("no interaction names an item of the catalog")
    neighbours = ItemNeighbours.build([r for r in rows if r], num_items, window=window, top_k=top_k)
    report = {
        "users": len(sequences),
        "interactions": total,
        "interactions_in_catalog": kept,
        "items_with_neighbours": int((neighbours.indptr[1:] > neighbours.indptr[:-1]).sum()),
        "window": window,
        "top_k": top_k,
        "weight": "P(b | a) over pairs within `window` positions, either side, 1/distance",
    }
    return neighbours, report
