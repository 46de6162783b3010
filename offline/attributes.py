"""Deriving brand and category for catalogs that lack them: title-prefix brands, k-means categories.

Home Depot ships titles only; diversity caps and coverage metrics need a brand and a category per
item. Both are derived here, deterministically, and only where the catalog has no value:

- brand: the catalog's own recurring title prefixes. A prefix of 1–3 leading tokens is a brand
  when many titles start with it (`min_count`) and what follows it varies (no single next token
  takes `dominance` or more of its titles: "Home Decorators" is always followed by "Collection",
  so the brand is the longer "Home Decorators Collection"). Walking the prefix tree stops at the
  first such prefix, so product lines ("Delta Vero") do not become brands of their own; only under
  a prefix seldom used alone (`alone_share`) does a continuation holding a large share
  (`split_share`) of its titles become a brand ("American Standard", "American Imaginations").
  Prefixes starting with a number or made only of generic words (units, colours,
  "Heavy", "Commercial", ...) are never brands. Each title gets the longest brand it starts with.
- category: k-means over the item embeddings (faiss, fixed seed), each cluster named by its most
  distinctive stemmed title terms (within-cluster share × log inverse corpus frequency), e.g.
  "c17:drill-cordless".

`python -m offline.attributes --release R` prints what would be derived for a release (read-only).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ranker.retrieval import Analyzer

BRAND_METHOD = "title-prefix"
CATEGORY_METHOD = "kmeans"

# Leading words that start many titles without naming a maker: sizes, colours, materials, generic
# adjectives and product nouns. A prefix made only of these is never a brand.
GENERIC_WORDS = frozenset(
    """
    a an the and or with for of in on to by x new set pack pair kit lot case box
    in. ft. ft lb. lb oz. oz gal. gal sq. cu. mm cm yd. qt. pt. w v amp watt volt inch foot
    white black brown gray grey silver gold red blue green yellow orange beige tan ivory clear
    bronze chrome nickel brass copper stainless steel aluminum iron wood wooden oak pine cedar
    maple walnut cherry vinyl plastic glass ceramic porcelain stone marble granite concrete rubber
    heavy duty heavy-duty commercial industrial professional pro premium deluxe classic
    basic universal replacement decorative outdoor indoor large small medium mini extra super ultra
    round square rectangular double single triple solid flexible adjustable portable cordless
    wall floor ceiling door window kitchen bath bathroom garden patio
    light lights lamp led bulb tile tiles paint pipe wire cable screw screws
    hose fan fans vanity faucet shower sink toilet cabinet shelf rug mat curtain
    high low long short wide narrow thick thin hd lowes home depot
    """.split()  # noqa: SIM905 (a word list reads better as text)
)
# A leading digit makes a size or a count ("12V", "1/2", "#6", "2-Piece"); "3M" is a maker.
_NUMERIC = re.compile(r"^[#(]?\d(?![A-Z]$)")
_SPACES = re.compile(r"\s+")


def _tokens(title: str) -> list[str]:
    return _SPACES.split(html.unescape(title).strip())[:3] if title else []


def _generic(token: str, *, parts: bool = True) -> bool:
    """A size, a count or a generic word; with `parts`, "Single-Handle" is generic through its first part."""
    folded = token.casefold()
    return (
        folded in GENERIC_WORDS
        or (parts and folded.split("-", 1)[0] in GENERIC_WORDS)
        or bool(_NUMERIC.match(token))
        or not any(c.isalpha() for c in token)
    )


def _eligible(prefix: tuple[str, ...]) -> bool:
    """A brand starts with a word, not a number, and is not made only of generic words."""
    # Whole words only: "Blue-Tap" is a maker though "blue" is generic.
    return not bool(_NUMERIC.match(prefix[0])) and not all(_generic(t, parts=False) for t in prefix)


def learn_brands(
    titles: Sequence[str],
    *,
    min_count: int = 3,
    dominance: float = 0.6,
    split_share: float = 0.15,
    alone_share: float = 0.2,
    max_tokens: int = 3,
) -> dict[tuple[str, ...], str]:
    """Brand prefixes (casefolded token tuples) → display form (the most common casing)."""
    counts: Counter[tuple[str, ...]] = Counter()
    following: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
    spellings: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
    for title in titles:
        tokens = _tokens(title)
        folded = tuple(t.casefold() for t in tokens)
        for n in range(1, min(len(tokens), max_tokens) + 1):
            key = folded[:n]
            counts[key] += 1
            spellings[key][" ".join(tokens[:n])] += 1
            # "" marks the end of a possible name: the title ends, or a size/generic word follows.
            following[key][folded[n] if n < len(folded) and not _generic(tokens[n]) else ""] += 1

    brands: dict[tuple[str, ...], str] = {}

    def complete(prefix: tuple[str, ...]) -> bool:
        if len(prefix) >= max_tokens:
            return True
        nxt = following[prefix]
        top_token, top = nxt.most_common(1)[0]
        # A prefix followed almost always by the same (non-generic) word starts a longer name.
        return top_token == "" or top / counts[prefix] < dominance

    def walk(prefix: tuple[str, ...]) -> None:
        if counts[prefix] < min_count:
            return
        children = [(*prefix, t) for t in sorted(following[prefix]) if t]
        if not complete(prefix):
            for child in children:
                walk(child)
            return
        if _eligible(prefix):
            brands[prefix] = spellings[prefix].most_common(1)[0][0]
        # Under a name seldom used alone ("American" + Standard/Imaginations/Craftsman...), a
        # continuation holding a large share is a separate name of its own.
        alone = following[prefix][""] / counts[prefix]
        if len(prefix) < max_tokens and alone < alone_share:
            for child in children:
                if counts[child] >= max(min_count, split_share * counts[prefix]):
                    walk(child)

    for first in sorted({key for key in counts if len(key) == 1}):
        walk(first)
    return brands


def derive_brands(titles: Sequence[str], **options: Any) -> list[str | None]:
    """Brand of each title from its leading tokens (None when it starts with no learned brand)."""
    brands = learn_brands(titles, **options)
    longest = max((len(k) for k in brands), default=0)
    out: list[str | None] = []
    for title in titles:
        folded = tuple(t.casefold() for t in _tokens(title))
        found = None
        for n in range(min(longest, len(folded)), 0, -1):
            found = brands.get(folded[:n])
            if found is not None:
                break
        out.append(found)
    return out


def default_k(n: int) -> int:
    """About sqrt(n)/2 clusters, at least 50 when the catalog has room (≥ 40 items per cluster), at most 300."""
    return int(min(300, max(round(math.sqrt(n) / 2), min(50, n // 40), 1)))


def _kmeans(embeddings: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=25,
        seed=seed,
        spherical=True,
        verbose=False,
        max_points_per_centroid=512,
        min_points_per_centroid=1,
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign.reshape(-1).astype(np.int64)


def _cluster_names(labels: np.ndarray, token_lists: Sequence[Sequence[str]], k: int, terms: int) -> list[str]:
    """Each cluster's most distinctive terms: share of its titles with the term × log(n / titles with it)."""
    n = len(token_lists)
    df: Counter[str] = Counter()
    per_cluster: list[Counter[str]] = [Counter() for _ in range(k)]
    for label, tokens in zip(labels.tolist(), token_lists, strict=True):
        unique = {t for t in tokens if any(c.isalpha() for c in t) and len(t) > 2}
        df.update(unique)
        per_cluster[label].update(unique)
    sizes = np.bincount(labels, minlength=k)
    names = []
    for c in range(k):
        scored = sorted(
            ((count / sizes[c] * math.log(n / df[t]), t) for t, count in per_cluster[c].items()),
            key=lambda pair: (-pair[0], pair[1]),
        )
        words = [t for _, t in scored[:terms]] or ["misc"]
        names.append(f"c{c}:{'-'.join(words)}")
    return names


def derive_categories(
    embeddings: np.ndarray,
    k: int | None = None,
    *,
    titles: Sequence[str] | None = None,
    seed: int = 13,
    terms: int = 2,
) -> tuple[list[str], dict[str, Any]]:
    """A category per item from k-means over its embedding, named by distinctive title terms."""
    n = len(embeddings)
    if n == 0:
        return [], {"k": 0, "sizes": {}}
    k = max(1, min(k or default_k(n), n))
    labels = _kmeans(embeddings, k, seed) if k > 1 else np.zeros(n, dtype=np.int64)
    tokens = Analyzer().analyze_many(titles) if titles is not None else [[] for _ in range(n)]
    names = _cluster_names(labels, tokens, k, terms)
    sizes = np.bincount(labels, minlength=k)
    report = {
        "k": k,
        "seed": seed,
        "sizes": {
            "min": int(sizes.min()),
            "p10": float(np.percentile(sizes, 10)),
            "median": float(np.median(sizes)),
            "p90": float(np.percentile(sizes, 90)),
            "max": int(sizes.max()),
            "singletons": int((sizes == 1).sum()),
            "empty": int((sizes == 0).sum()),
        },
    }
    return [names[label] for label in labels.tolist()], report


def fill_attributes(
    items: pl.DataFrame, embeddings: np.ndarray, *, k: int | None = None, seed: int = 13
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Fill null brand/category values with derived ones; given values are kept as they are.

    The report (for the release manifest) says per attribute how many values were given, how many
    derived, the resulting coverage (share of items with a value) and the method.
    """
    if len(items) != len(embeddings):
        raise ValueError(f"items has {len(items)} rows, embeddings {len(embeddings)}: they must be row-aligned")
    titles = [t or "" for t in items["title"].to_list()]
    n = len(items)
    columns = {name: items[name].to_list() if name in items.columns else [None] * n for name in ("brand", "category")}
    report: dict[str, Any] = {}

    brand_given = columns["brand"]
    if any(b is None for b in brand_given):
        derived_brands = derive_brands(titles)
        filled = [g if g is not None else d for g, d in zip(brand_given, derived_brands, strict=True)]
    else:
        filled = list(brand_given)
    report["brand"] = _summary(brand_given, filled, BRAND_METHOD, {})
    brands = filled

    cat_given = columns["category"]
    if any(c is None for c in cat_given):
        derived_cats, extra = derive_categories(embeddings, k, titles=titles, seed=seed)
        filled = [g if g is not None else d for g, d in zip(cat_given, derived_cats, strict=True)]
    else:
        extra, filled = {}, list(cat_given)
    report["category"] = _summary(cat_given, filled, CATEGORY_METHOD, extra)

    out = items.with_columns(
        pl.Series("brand", brands, dtype=pl.Utf8),
        pl.Series("category", filled, dtype=pl.Utf8),
    )
    return out, report


def _summary(
    given: Sequence[str | None], filled: Sequence[str | None], method: str, extra: dict[str, Any]
) -> dict[str, Any]:
    n_given = sum(v is not None for v in given)
    n_filled = sum(v is not None for v in filled)
    return {
        "given": n_given,
        "derived": n_filled - n_given,
        "coverage": n_filled / len(filled) if filled else 0.0,
        "distinct": len({v for v in filled if v is not None}),
        "method": method if n_filled > n_given else "given",
        **extra,
    }


def brand_agreement(derived: Sequence[str | None], truth: Sequence[str | None]) -> dict[str, float]:
    """Precision (derived brands that equal the true one) and recall (true brands recovered), casefolded."""
    pairs = list(zip(derived, truth, strict=True))
    labelled = [(d, t) for d, t in pairs if d is not None and t is not None]
    correct = sum(d.casefold() == t.casefold() for d, t in labelled)
    n_derived = sum(d is not None for d, _ in pairs)
    n_true = sum(t is not None for _, t in pairs)
    return {
        "precision": correct / n_derived if n_derived else 0.0,
        "recall": correct / n_true if n_true else 0.0,
        "coverage": n_derived / len(pairs) if pairs else 0.0,
    }


def category_agreement(derived: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Purity (each cluster counted as its majority true category) and adjusted Rand index."""
    from sklearn.metrics import adjusted_rand_score

    by_cluster: dict[str, Counter[str]] = defaultdict(Counter)
    for d, t in zip(derived, truth, strict=True):
        by_cluster[d][t] += 1
    purity = sum(c.most_common(1)[0][1] for c in by_cluster.values()) / max(1, len(truth))
    return {"purity": purity, "ari": float(adjusted_rand_score(truth, derived)), "clusters": len(by_cluster)}


def _inspect(release_dir: Path, sample: int, seed: int) -> dict[str, Any]:
    items = pl.read_parquet(release_dir / "items.parquet")
    embeddings = np.load(release_dir / "embeddings.npy", mmap_mode="r")
    start = time.perf_counter()
    blank = items.with_columns(
        pl.lit(None, dtype=pl.Utf8).alias("brand"), pl.lit(None, dtype=pl.Utf8).alias("category")
    )
    filled, report = fill_attributes(blank, np.asarray(embeddings), seed=seed)
    report["seconds"] = round(time.perf_counter() - start, 2)
    given_brands, given_cats = items["brand"].to_list(), items["category"].to_list()
    if any(b is not None for b in given_brands):
        report["brand"]["vs_given"] = brand_agreement(filled["brand"].to_list(), given_brands)
    if all(c is not None for c in given_cats):
        report["category"]["vs_given"] = category_agreement(filled["category"].to_list(), given_cats)
    rows = filled.sample(n=min(sample, len(filled)), seed=seed) if sample else filled.head(0)
    report["sample"] = [
        {"title": r["title"], "brand": r["brand"], "category": r["category"]} for r in rows.iter_rows(named=True)
    ]
    top = Counter(b for b in filled["brand"].to_list() if b is not None).most_common(15)
    report["brand"]["top"] = top
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offline.attributes", description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, required=True, help="release folder (items.parquet, embeddings.npy)")
    parser.add_argument("--sample", type=int, default=20, help="how many derived rows to show")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report = _inspect(args.release, args.sample, args.seed)
    if args.json:
        print(json.dumps(report))
        return 0
    sample = report.pop("sample")
    print(json.dumps(report, indent=1))
    for row in sample:
        print(f"{row['brand']!s:<28} {row['category']:<32} {row['title'][:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
