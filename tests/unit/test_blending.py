"""Blending: normalisations, overrides within guardrails, contributions that sum to the score."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ranker.blending import (
    DEFAULT_POLICY,
    Normalization,
    SignalPolicy,
    apply_overrides,
    blend,
    normalize,
    without_ranker,
)
from ranker.errors import InvalidArgument


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        (Normalization.IDENTITY, [1.0, 3.0, 2.0]),
        (Normalization.MINMAX, [0.0, 1.0, 0.5]),
        (Normalization.RANK, [1 / 3, 1.0, 0.5]),
    ],
)
def test_normalize(how: Normalization, expected: list[float]) -> None:
    assert normalize(np.array([1.0, 3.0, 2.0]), how) == pytest.approx(expected)


def test_constant_signal_normalises_to_zero() -> None:
    assert normalize(np.array([2.0, 2.0]), Normalization.MINMAX).tolist() == [0.0, 0.0]
    assert normalize(np.array([2.0, 2.0]), Normalization.ZSCORE).tolist() == [0.0, 0.0]


def test_tied_values_share_their_rank() -> None:
    assert normalize(np.array([5.0, 7.0, 5.0, 1.0]), Normalization.RANK).tolist() == [0.5, 1.0, 0.5, 0.25]


@pytest.mark.parametrize("how", [Normalization.MINMAX, Normalization.ZSCORE])
def test_values_near_the_float_limit_normalise_like_small_ones(how: Normalization) -> None:
    huge = normalize(np.array([1e308, -1e308, 0.0, 5e307]), how)
    assert np.isfinite(huge).all()
    assert huge == pytest.approx(normalize(np.array([1.0, -1.0, 0.0, 0.5]), how))


def test_infinite_values_count_as_missing() -> None:
    policy = {"margin": SignalPolicy(weight=1.0, normalization=Normalization.MINMAX)}
    result = blend({"margin": np.array([math.inf, 2.0, 4.0])}, policy)
    assert result.final.tolist() == [0.0, 0.0, 1.0]  # filled with the lowest value present


def test_blend_sums_weighted_normalised_signals() -> None:
    policy = {
        "a": SignalPolicy(weight=2.0, normalization=Normalization.IDENTITY),
        "b": SignalPolicy(weight=0.5, normalization=Normalization.MINMAX),
    }
    result = blend({"a": np.array([1.0, 0.0]), "b": np.array([0.0, 4.0])}, policy)
    assert result.final.tolist() == pytest.approx([2.0, 0.5])
    assert result.contributions.sum(axis=0) == pytest.approx(result.final)


@pytest.mark.parametrize("weight", [-0.1, math.nan, math.inf, 10.5])
def test_out_of_bounds_weights_are_rejected_with_the_field(weight: float) -> None:
    with pytest.raises(InvalidArgument, match=r"blend.weights\['ranker'\].*0..10"):
        apply_overrides(DEFAULT_POLICY, {"ranker": weight}, max_weight=10.0)


def test_override_keeps_normalisation() -> None:
    policy = apply_overrides(DEFAULT_POLICY, {"dense": 0.3}, max_weight=10.0)
    assert policy["dense"].weight == 0.3
    assert policy["dense"].normalization is DEFAULT_POLICY["dense"].normalization


def test_without_ranker_moves_its_weight_to_the_fusion() -> None:
    policy = apply_overrides(DEFAULT_POLICY, {"ranker": 2.0, "retrieval": 0.5}, max_weight=10.0)
    fallback = without_ranker(policy)
    assert "ranker" not in fallback
    assert fallback["retrieval"].weight == 2.5
    assert fallback["dense"] == policy["dense"]
