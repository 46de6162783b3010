"""Feature rows: shape, order of names, and values a user could check by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.features import FEATURE_NAMES, NUM_FEATURES, assemble


def col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def test_shape_and_dtype() -> None:
    x = assemble(["drill"], [["drill", "bit"], ["paint"]], np.array([0.9, 0.1]), np.array([2.0, 0.0]))
    assert x.shape == (2, NUM_FEATURES) and x.dtype == np.float32


def test_overlap_features() -> None:
    x = assemble(["cordless", "drill"], [["cordless", "drill", "kit"], ["drill"]], np.zeros(2), np.zeros(2))
    assert x[:, col("query_term_coverage")].tolist() == [1.0, 0.5]
    assert x[:, col("title_term_precision")] == pytest.approx([2 / 3, 1.0])
    assert x[:, col("query_bigram_coverage")].tolist() == [1.0, 0.0]


def test_relative_features() -> None:
    x = assemble(["a"], [["a"], ["b"], ["c"]], np.array([0.2, 0.8, 0.5]), np.array([4.0, 2.0, 0.0]))
    assert x[:, col("dense_gap_to_best")] == pytest.approx([-0.6, 0.0, -0.3])
    assert x[:, col("dense_rank_reciprocal")] == pytest.approx([1 / 3, 1.0, 0.5])
    assert x[:, col("bm25_ratio_to_best")] == pytest.approx([1.0, 0.5, 0.0])


def test_no_lexical_match_gives_zero_lexical_features() -> None:
    x = assemble(["zzz"], [["a"], ["b"]], np.array([0.3, 0.1]), np.zeros(2))
    assert not x[:, col("bm25_ratio_to_best")].any()
    assert not x[:, col("bm25_rank_reciprocal")].any()


def test_empty_candidates() -> None:
    assert assemble(["a"], [], np.zeros(0), np.zeros(0)).shape == (0, NUM_FEATURES)
