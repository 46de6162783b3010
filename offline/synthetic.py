"""`python -m offline.synthetic`: a large synthetic release grown from a real one, for scale benchmarks.

    python -m offline.synthetic --base releases/homedepot-v2 --items 1000000 --out releases/synthetic-1m

Item i is variant i // n of base item i % n (n: the base's items). Variant 0 is the base item
itself; variant v > 0 gets the id `<id>~v<v>`, the title `<title> <SUFFIX> <v>` and the base
embedding plus Gaussian noise, renormalised (mean cosine to the base item about 0.9). That is how
a big shop's catalog looks to the index: many near-duplicates (sizes, colours, sellers) of fewer
products, so BM25 posting lists and the HNSW graph grow with the item count as they would.

The models, tokenizer and policy are the base release's (hard links), and the FAISS HNSW index and
BM25 index are built over all items with the export's settings, so `ranker serve --release OUT`
serves it like any release. It is for latency and memory measurements only: its judgments are
the base's and say nothing about quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from offline.export import EF_CONSTRUCTION, HNSW_M, HNSW_THRESHOLD, publish, stamp
from ranker import release as layout
from ranker.features import TitleIndex
from ranker.policy import POLICY_FILE
from ranker.retrieval import Analyzer, DenseIndex, LexicalIndex

SUFFIX = "Variant"
NOISE = 0.0165  # per-dimension sigma: cosine to the base embedding ~0.9 at 384 dimensions
SHARED = (layout.TOKENIZER, layout.MODEL_REPOSITORY, POLICY_FILE)


def grow_items(base: pl.DataFrame, items: int) -> pl.DataFrame:
    """`items` rows: the base rows repeated, variant v > 0 with a new id and title."""
    n = base.height
    source = np.arange(items) % n
    variant = np.arange(items) // n
    grown = base[source].with_columns(variant=pl.Series(variant))
    suffix = pl.format(" {} {}", pl.lit(SUFFIX), pl.col("variant"))
    return grown.with_columns(
        item_id=pl.when(pl.col("variant") == 0)
        .then(pl.col("item_id"))
        .otherwise(pl.format("{}~v{}", "item_id", "variant")),
        title=pl.when(pl.col("variant") == 0).then(pl.col("title")).otherwise(pl.col("title") + suffix),
    ).drop("variant")


def grow_embeddings(base: np.ndarray, items: int, seed: int) -> np.ndarray:
    """Row i: base row i % n, plus N(0, NOISE²) noise when i >= n, L2-normalised."""
    rng = np.random.default_rng(seed)
    n, dim = base.shape
    out = np.empty((items, dim), dtype=np.float32)
    chunk = 100_000
    for start in tqdm(range(0, items, chunk), desc="embeddings", unit="chunk"):
        stop = min(items, start + chunk)
        rows = np.asarray(base[np.arange(start, stop) % n], dtype=np.float32)
        noisy = np.arange(start, stop) >= n
        rows[noisy] += rng.normal(0.0, NOISE, size=(int(noisy.sum()), dim)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        out[start:stop] = rows
    return out


def build(base_dir: Path, items: int, staging: Path, seed: int) -> dict[str, object]:
    base_manifest = json.loads((base_dir / layout.MANIFEST).read_text())
    base_items = pl.read_parquet(base_dir / layout.ITEMS)
    if items < base_items.height:
        raise SystemExit(f"--items {items} is below the base release's {base_items.height} items")
    for name in SHARED:
        source = base_dir / name
        if source.is_dir():
            shutil.copytree(source, staging / name, copy_function=os.link)
        elif source.is_file():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            os.link(source, staging / name)
    grown = grow_items(base_items, items)
    grown.write_parquet(staging / layout.ITEMS)
    print(f"building BM25 over {items:,} titles", file=sys.stderr)
    titles = grown["title"].to_list()
    tokens = Analyzer().analyze_many(titles)
    LexicalIndex.build(tokens).save(staging / layout.LEXICAL_DIR)
    TitleIndex.build(titles, tokens).save(staging / layout.TITLE_INDEX)
    del tokens, titles
    embeddings = grow_embeddings(np.load(base_dir / layout.EMBEDDINGS, mmap_mode="r"), items, seed)
    with tqdm(total=items, desc="HNSW index", unit="item", unit_scale=True) as bar:
        dense = DenseIndex.build(
            embeddings,
            hnsw_threshold=HNSW_THRESHOLD,
            hnsw_m=HNSW_M,
            ef_construction=EF_CONSTRUCTION,
            on_added=bar.update,
        )
    dense.save(staging / layout.DENSE_INDEX, staging / layout.EMBEDDINGS)
    manifest = dict(base_manifest)
    manifest.update(
        stamp(staging),
        index={**base_manifest["index"], "items": items},
        synthetic={
            "base_release": base_manifest["release_id"],
            "base_items": base_items.height,
            "items": items,
            "seed": seed,
            "noise_sigma": NOISE,
            "note": "for latency and memory benchmarks only; see offline/synthetic.py",
        },
    )
    (staging / layout.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    layout.read_manifest(staging)  # what the service will check, checked now
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a release written by offline.export")
    parser.add_argument("--items", type=int, default=1_000_000, help="items in the synthetic release")
    parser.add_argument("--out", type=Path, required=True, help="release folder to write")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{out.name}-", dir=out.parent))
    try:
        manifest = build(args.base.resolve(), args.items, staging, args.seed)
        publish(staging, out, force=args.force)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(json.dumps({"release": str(out), "release_id": manifest["release_id"], "items": args.items}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
