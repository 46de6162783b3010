"""offline.attributes on small synthetic catalogs: brands from title prefixes, categories from k-means."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from offline.attributes import (
    brand_agreement,
    category_agreement,
    default_k,
    derive_brands,
    derive_categories,
    fill_attributes,
)

TITLES = [
    # A one-word brand followed by varied words and sizes.
    "Ryobi 18V Cordless Drill",
    "Ryobi ONE+ Circular Saw",
    "Ryobi 40V Leaf Blower",
    "Ryobi Orbital Sander",
    # A three-word brand: "Home" is always followed by "Decorators", "Decorators" by "Collection".
    "Home Decorators Collection 44 in. Ceiling Fan",
    "Home Decorators Collection Oak Vanity",
    "Home Decorators Collection 5 ft. Area Rug",
    "Home Decorators Collection Wall Mirror",
    # A brand with product lines: the lines stay "Delta".
    "Delta Vero 1-Handle Shower Faucet",
    "Delta Pilar Kitchen Faucet",
    "Delta Leland Bath Faucet",
    "Delta 2-Handle Tub Faucet",
    "Delta Cassidy Towel Bar",
    # Generic leading words and sizes are never brands.
    "1/2 in. Copper Pipe Cap",
    "1/2 in. Brass Ball Valve",
    "1/2 in. PVC Elbow",
    "White Vinyl Fence Post",
    "White Porcelain Sink",
    "White Ceramic Tile",
    "Heavy Duty Shelf Bracket",
    "Heavy Duty Tarp",
    "Heavy Duty Hinge",
    # Seen twice only: below the frequency threshold.
    "Acme Widget",
    "Acme Gadget",
]


def test_brands_are_recurring_prefixes_with_varied_continuations() -> None:
    brands = derive_brands(TITLES)
    assert brands[:4] == ["Ryobi"] * 4
    assert brands[4:8] == ["Home Decorators Collection"] * 4
    assert brands[8:13] == ["Delta"] * 5


def test_sizes_generic_words_and_rare_prefixes_get_no_brand() -> None:
    assert derive_brands(TITLES)[13:] == [None] * 11


def test_a_maker_whose_name_starts_with_a_generic_part_is_kept() -> None:
    titles = ["Blue-Tap 1/4 in. Concrete Screw", "Blue-Tap 3/16 in. Anchor", "Blue-Tap Drill Bit"]
    assert derive_brands(titles) == ["Blue-Tap"] * 3


def test_brand_casing_is_the_most_common_spelling_and_matching_ignores_case() -> None:
    titles = ["BEHR Premium Paint", "BEHR Deck Stain", "Behr Primer", "BEHR Marquee Paint"]
    assert derive_brands(titles) == ["BEHR"] * 4


def test_a_large_sub_name_is_a_brand_of_its_own() -> None:
    titles = [f"American Standard Toilet {i}" for i in range(6)] + [f"American Woodmark Cabinet {i}" for i in range(6)]
    titles += ["American Kennel Crate", "American Heritage Stool"]
    brands = derive_brands(titles)
    assert brands[:6] == ["American Standard"] * 6
    assert brands[6:12] == ["American Woodmark"] * 6


def test_brand_derivation_is_deterministic_under_reordering() -> None:
    reordered = TITLES[::-1]
    assert derive_brands(reordered) == derive_brands(TITLES)[::-1]


def test_brand_agreement_counts_precision_and_recall() -> None:
    scores = brand_agreement(["Ryobi", "delta", None, "Moen"], ["Ryobi", "Delta", "Kohler", "Kohler"])
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)


def _blobs(seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """Three well-separated groups of unit vectors, with titles that name them."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:3] * 5
    groups = [
        ("drill", "cordless drill driver"),
        ("paint", "interior paint gallon"),
        ("faucet", "kitchen faucet chrom"),
    ]
    vectors, truth, titles = [], [], []
    for (name, words), centre in zip(groups, centres, strict=True):
        for i in range(30):
            vectors.append(centre + rng.normal(scale=0.3, size=8))
            truth.append(name)
            titles.append(f"Brand{i} {words} model {i}")
    x = np.asarray(vectors, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), truth, titles


def test_categories_recover_separated_groups_and_are_named_by_their_terms() -> None:
    x, truth, titles = _blobs()
    labels, report = derive_categories(x, 3, titles=titles)
    assert category_agreement(labels, truth) == {"purity": 1.0, "ari": pytest.approx(1.0), "clusters": 3}
    assert report["k"] == 3 and report["sizes"]["min"] == 30
    words = {"drill": "cordless drill driver", "paint": "interior paint gallon", "faucet": "kitchen faucet chrom"}
    for label, group in zip(labels, truth, strict=True):
        prefix, name = label.split(":", 1)
        assert prefix.startswith("c") and len(name.split("-")) == 2
        assert set(name.split("-")) <= set(words[group].split())


def test_categories_are_deterministic() -> None:
    x, _, titles = _blobs()
    assert derive_categories(x, 3, titles=titles)[0] == derive_categories(x, 3, titles=titles)[0]


def test_default_k_is_about_half_the_square_root_within_bounds() -> None:
    assert default_k(55_000) == 117
    assert default_k(400) == 10
    assert default_k(4_000) == 50
    assert default_k(10_000_000) == 300
    assert default_k(3) == 1


def test_fill_attributes_keeps_given_values_and_fills_only_nulls() -> None:
    x, _, titles = _blobs()
    n = len(titles)
    items = pl.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(n)],
            "title": titles,
            "category": ["Given"] + [None] * (n - 1),
            "brand": [None] * n,
            "price": [1.0] * n,
        },
        schema={"item_id": pl.Utf8, "title": pl.Utf8, "category": pl.Utf8, "brand": pl.Utf8, "price": pl.Float64},
    )
    filled, report = fill_attributes(items, x, k=3)
    assert filled.columns == items.columns and len(filled) == n
    assert filled["category"][0] == "Given"
    assert filled["category"].null_count() == 0
    assert report["category"]["given"] == 1 and report["category"]["derived"] == n - 1
    assert report["category"]["coverage"] == 1.0 and report["category"]["method"] == "kmeans"
    # "Brand0".."Brand29" each start one title only per group: too rare to be brands.
    assert report["brand"]["derived"] == n - filled["brand"].null_count()
    assert filled["price"].to_list() == items["price"].to_list()


def test_fill_attributes_with_everything_given_changes_nothing() -> None:
    x, truth, titles = _blobs()
    items = pl.DataFrame({"item_id": [str(i) for i in range(len(titles))], "title": titles, "category": truth})
    items = items.with_columns(pl.lit("Acme").alias("brand"))
    filled, report = fill_attributes(items, x)
    assert filled["category"].to_list() == truth and set(filled["brand"].to_list()) == {"Acme"}
    assert report["brand"]["method"] == "given" and report["category"]["method"] == "given"
    assert report["brand"]["derived"] == 0 and report["category"]["derived"] == 0


def test_fill_attributes_refuses_misaligned_embeddings() -> None:
    x, _, _ = _blobs()
    items = pl.DataFrame({"item_id": ["a"], "title": ["t"], "category": [None], "brand": [None]})
    with pytest.raises(ValueError, match="row-aligned"):
        fill_attributes(items, x)
