"""offline.metrics diversity measures: ILD@k and coverage@k against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from offline import metrics


def test_ild_of_identical_items_is_zero() -> None:
    same = np.tile([[0.6, 0.8]], (5, 1))
    assert metrics.ild_at_k(same) == pytest.approx(0.0)


def test_ild_of_orthogonal_items_is_one() -> None:
    assert metrics.ild_at_k(np.eye(4)) == pytest.approx(1.0)


def test_ild_hand_computed_and_normalises_rows() -> None:
    # Pairs: (a, b) cosine 1, (a, c) 0, (b, c) 0 -> mean 1/3; b is a scaled copy of a.
    rows = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    assert metrics.ild_at_k(rows) == pytest.approx(1 - 1 / 3)


def test_ild_looks_only_at_the_top_k() -> None:
    rows = np.vstack([np.tile([[1.0, 0.0]], (10, 1)), np.eye(2)])
    assert metrics.ild_at_k(rows, k=10) == pytest.approx(0.0)
    assert metrics.ild_at_k(rows, k=12) > 0.0


def test_ild_needs_two_items() -> None:
    assert metrics.ild_at_k(np.zeros((0, 3))) == 0.0
    assert metrics.ild_at_k(np.ones((1, 3))) == 0.0


def test_coverage_counts_distinct_non_null_values_in_the_top_k() -> None:
    values = ["drills", "saws", "drills", None, "paint", *["glue"] * 10]
    assert metrics.coverage_at_k(values, k=4) == 2
    assert metrics.coverage_at_k(values, k=10) == 4
    assert metrics.coverage_at_k([None, None]) == 0
    assert metrics.coverage_at_k([]) == 0
