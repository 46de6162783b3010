"""Feature rows: shape, order of names, and values a user could check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.features import FEATURE_NAMES, NO_NUMBER, NUM_FEATURES, assemble, number_match, trigram_coverage


def features(query: list[str], items: list[list[str]], dense: np.ndarray, bm25: np.ndarray) -> np.ndarray:
    """assemble() where the raw texts are the terms joined by spaces."""
    return assemble(" ".join(query), query, [" ".join(t) for t in items], items, dense, bm25)


def col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def test_shape_and_dtype() -> None:
    x = features(["drill"], [["drill", "bit"], ["paint"]], np.array([0.9, 0.1]), np.array([2.0, 0.0]))
    assert x.shape == (2, NUM_FEATURES) and x.dtype == np.float32


def test_overlap_features() -> None:
    x = features(["cordless", "drill"], [["cordless", "drill", "kit"], ["drill"]], np.zeros(2), np.zeros(2))
    assert x[:, col("query_term_coverage")].tolist() == [1.0, 0.5]
    assert x[:, col("title_term_precision")] == pytest.approx([2 / 3, 1.0])
    assert x[:, col("query_bigram_coverage")].tolist() == [1.0, 0.0]


def test_relative_features() -> None:
    x = features(["a"], [["a"], ["b"], ["c"]], np.array([0.2, 0.8, 0.5]), np.array([4.0, 2.0, 0.0]))
    assert x[:, col("dense_gap_to_best")] == pytest.approx([-0.6, 0.0, -0.3])
    assert x[:, col("dense_rank_reciprocal")] == pytest.approx([1 / 3, 1.0, 0.5])
    assert x[:, col("bm25_ratio_to_best")] == pytest.approx([1.0, 0.5, 0.0])


def test_no_lexical_match_gives_zero_lexical_features() -> None:
    x = features(["zzz"], [["a"], ["b"]], np.array([0.3, 0.1]), np.zeros(2))
    assert not x[:, col("bm25_ratio_to_best")].any()
    assert not x[:, col("bm25_rank_reciprocal")].any()


def test_empty_candidates() -> None:
    assert features(["a"], [], np.zeros(0), np.zeros(0)).shape == (0, NUM_FEATURES)


def test_trigram_coverage_survives_typos_and_joined_words() -> None:
    cover = trigram_coverage("dewalt driil", ["DEWALT 20V Drill", "Behr paint", ""])
    assert cover[0] > 0.6 > cover[1] and cover[2] == 0.0
    # "2x4" against "2 x 4": shares " 2 " padding trigrams only partly, "2x4" itself fully.
    assert trigram_coverage("2x4", ["2x4 stud"])[0] == 1.0
    assert trigram_coverage("", ["anything"]).tolist() == [0.0]


def test_trigrams_never_straddle_two_titles() -> None:
    # Padded and joined, "ab" and "cd" read " ab  cd ": its windows "b  " and "  c" straddle both titles
    # and are in the query " b  c ", so they must count for neither.
    assert trigram_coverage("b  c", ["ab", "cd"]).tolist() == [0.0, 0.0]
    assert trigram_coverage("ab", ["xx", "ab"]).tolist() == [0.0, 1.0]


def test_number_match() -> None:
    assert number_match("2 in. x 4 in. x 8 ft.", ["2 in. x 4 in. x 8 ft. Stud", "2 in. x 6 in. x 12 ft."]).tolist() == [
        1.0,
        pytest.approx(1 / 3),
    ]
    assert number_match("cordless drill", ["18V drill"]).tolist() == [NO_NUMBER]
    # Whole numbers only: "12" is not matched inside "120".
    assert number_match("12 volt", ["120 volt"]).tolist() == [0.0]


def test_last_query_term_is_the_product_type() -> None:
    x = features(["cordless", "drill"], [["drill", "bit"], ["cordless", "saw"]], np.zeros(2), np.zeros(2))
    assert x[:, col("last_query_term_in_title")].tolist() == [1.0, 0.0]
