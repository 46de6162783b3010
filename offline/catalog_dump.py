"""`python -m offline.catalog_dump`: the catalog a release serves once the shared catalog log's changes are applied,
written as the next export's --catalog, with the log position it includes (for --catalog-log-through).

    # RANKER_CATALOG_STORE (and its password and TLS settings) from the environment, as the rankers have them
    python -m offline.catalog_dump --release releases/current --out catalog.csv
    # {"through": "1795414399552-0", "items": 54702, "upserted": 120, "deleted": 85, ...}
    python -m offline.export --catalog catalog.csv --judgments judgments.csv --out releases/next \\
        --catalog-log-through 1795414399552-0

For a shop whose only copy of the online changes is the log. The release's items come from its items.parquet;
the entries after the release's own position (its manifest's catalog_log_through; the whole log without one) are
folded over them: an upserted item replaces the release's row or is added, a deleted one is left out. A compacted
log restates every changed item, so the fold is the same whether or not a compaction happened.

An attribute the release derived for every item (its manifest's data.attributes says given 0: Home Depot's
k-means categories and title brands) is left empty for the release's items, so that the next export derives it
again over the new catalog; values an upsert gave are kept. Written as CSV, or parquet for a .parquet --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from offline import cli
from ranker import release as layout
from ranker.catalog_log import FIRST, CatalogLog, LogEntry, fold_entries


def derived_attributes(manifest: dict[str, Any]) -> list[str]:
    """The attributes the release derived for all of its items (none was given in its catalog)."""
    report = (manifest.get("data") or {}).get("attributes") or {}
    return sorted(name for name, info in report.items() if isinstance(info, dict) and info.get("given") == 0)


def apply_log(
    items: pl.DataFrame, entries: Sequence[LogEntry], *, derived: Collection[str] = ()
) -> tuple[pl.DataFrame, dict[str, int]]:
    """The release's items with the entries' net effect: upserted items replace or join them, deleted ones go."""
    upserts, deletes, _ = fold_entries(entries)
    changed = [item.item_id for item, _ in upserts] + list(deletes)
    kept = items.filter(~pl.col("item_id").is_in(changed))
    kept = kept.with_columns(pl.lit(None, dtype=items.schema[name]).alias(name) for name in derived)
    rows = [{name: getattr(item, name) for name in items.columns} for item, _ in upserts]
    upserted = pl.DataFrame(rows, schema=items.schema, orient="row") if rows else items.clear()
    present = set(items["item_id"].to_list())
    counts = {
        "release_items": items.height,
        "upserted": len(upserts),
        "added": sum(item.item_id not in present for item, _ in upserts),
        "deleted": sum(item_id in present for item_id in deletes),
    }
    out = pl.concat([kept, upserted])
    return out, {**counts, "items": out.height}


async def dump(release: Path, out: Path, shared: CatalogLog) -> dict[str, Any]:
    manifest = json.loads((release / layout.MANIFEST).read_text())
    start = layout.Manifest.from_json(manifest).catalog_log_through or FIRST
    items = pl.read_parquet(release / layout.ITEMS)
    entries = await shared.read(start)
    derived = derived_attributes(manifest)
    live, counts = apply_log(items, entries, derived=derived)
    if out.suffix == ".parquet":
        live.write_parquet(out)
    else:
        live.write_csv(out)
    return {
        "release": manifest["release_id"],
        "out": str(out),
        "through": entries[-1].id if entries else start,  # pass to offline.export --catalog-log-through
        "entries": len(entries),
        "emptied_derived_attributes": derived,
        **counts,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m offline.catalog_dump", description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=cli.existing_dir, required=True, help="the release the rankers serve")
    parser.add_argument("--out", type=Path, required=True, help="catalog file to write (.csv, or .parquet)")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from ranker.config import load_settings
    from ranker.server import shared_catalog_log

    async with shared_catalog_log(load_settings()) as shared:
        return await dump(args.release, args.out, shared)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
