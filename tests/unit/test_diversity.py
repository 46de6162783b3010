"""Diversity selectors: caps, MMR, max-sum and DPP trade relevance for variety, deterministically."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.diversity import Placed, monotone_scores, select
from ranker.domain import DiversityMethod, DiversitySpec


def clustered(n_per: int = 5) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Two tight clusters; cluster A holds the most relevant items."""
    rng = np.random.default_rng(7)
    a = np.array([1.0, 0.0, 0.0]) + rng.normal(0, 0.01, (n_per, 3))
    b = np.array([0.0, 1.0, 0.0]) + rng.normal(0, 0.01, (n_per, 3))
    emb = np.vstack([a, b])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    relevance = np.concatenate([np.linspace(1.0, 0.8, n_per), np.linspace(0.7, 0.5, n_per)])
    return relevance, emb, ["A"] * n_per + ["B"] * n_per


def test_no_diversity_keeps_order() -> None:
    rel, emb, cats = clustered()
    assert select(rel, emb, DiversitySpec(), 4, cats, cats) == [0, 1, 2, 3]


def test_category_cap_is_never_exceeded() -> None:
    rel, emb, cats = clustered()
    chosen = select(rel, emb, DiversitySpec(max_per_category=2), 6, cats, [None] * 10)
    assert [cats[i] for i in chosen] == ["A", "A", "B", "B"]  # fewer than k: caps leave only 4


def test_mmr_brings_the_second_cluster_up() -> None:
    rel, emb, cats = clustered()
    chosen = select(rel, emb, DiversitySpec(method=DiversityMethod.MMR, strength=0.5), 4, cats, cats)
    assert chosen[0] == 0
    assert {cats[i] for i in chosen[:2]} == {"A", "B"}


def test_dpp_brings_the_second_cluster_up_and_is_deterministic() -> None:
    rel, emb, cats = clustered()
    spec = DiversitySpec(method=DiversityMethod.DPP, strength=0.5)
    chosen = select(rel, emb, spec, 4, cats, cats)
    assert chosen == select(rel, emb, spec, 4, cats, cats)
    assert {cats[i] for i in chosen[:2]} == {"A", "B"}
    assert len(set(chosen)) == 4


@pytest.mark.parametrize("strength", [0.01, 1e-300, 5e-324])
def test_dpp_with_tiny_strength_is_relevance_order(strength: float) -> None:
    rel, emb, cats = clustered()
    with np.errstate(invalid="raise"):  # no NaN on the way, even at the smallest float
        chosen = select(rel, emb, DiversitySpec(method=DiversityMethod.DPP, strength=strength), 4, cats, cats)
    assert chosen == [0, 1, 2, 3]


def test_monotone_scores_only_lowers_promoted_items() -> None:
    assert monotone_scores(np.array([1.0, 0.5, 0.8]), ["a", "b", "c"]).tolist() == [1.0, 0.5, 0.5 - 1e-6]
    assert monotone_scores(np.array([1.0, 1.0, 0.2]), ["a", "b", "c"]).tolist() == [1.0, 1.0, 0.2]
    # a tie shown against the id order: the second is pulled below, so the order reads "score, then id"
    assert monotone_scores(np.array([1.0, 1.0, 0.2]), ["b", "a", "c"]).tolist() == [1.0, 1.0 - 1e-6, 0.2]


def test_placed_items_fill_the_caps_and_their_window_positions() -> None:
    """Pins count against the caps, and a window fills only the positions its pins leave free, so the first
    page is the same whatever k is."""
    rel, emb, cats = clustered()
    spec = DiversitySpec(method=DiversityMethod.MMR, strength=0.5, max_per_category=2, window=4)
    pinned = Placed(positions=frozenset({2}), categories=["A"], brands=["A"])
    chosen = select(rel, emb, spec, 3, cats, cats, pinned)
    assert [cats[i] for i in chosen].count("A") == 1  # the pin is the other A
    spec = DiversitySpec(method=DiversityMethod.MMR, strength=0.5, window=4)
    short = select(rel, emb, spec, 3, cats, cats, Placed(positions=frozenset({2})))
    long = select(rel, emb, spec, 7, cats, cats, Placed(positions=frozenset({2})))
    assert long[:3] == short  # window 1 = 3 picks + the pin, whatever k


def near_duplicates() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Six near-copies of one product (the most relevant) and three distinct products below them."""
    rng = np.random.default_rng(11)
    base = np.eye(4)
    emb = np.vstack([base[0] + rng.normal(0, 0.02, (6, 4)), base[1:]])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    relevance = np.array([1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.7, 0.6, 0.5])
    return relevance, emb, ["dup"] * 6 + ["x", "y", "z"]


def test_max_sum_keeps_the_head_and_diversifies_the_tail() -> None:
    rel, emb, cats = near_duplicates()
    spec = DiversitySpec(method=DiversityMethod.MAX_SUM, strength=0.2)
    # The summed similarity grows with each copy taken: the first three copies stay on top, then
    # the distinct items beat the remaining copies.
    assert select(rel, emb, spec, 5, cats, cats) == [0, 1, 2, 6, 7]
    assert select(rel, emb, spec, 5, cats, cats) == [0, 1, 2, 6, 7]  # deterministic


def test_max_sum_sums_where_mmr_takes_the_max() -> None:
    rel, emb, cats = near_duplicates()
    # At the same strength MMR sees one copy's worth of redundancy and keeps the copies ...
    assert select(rel, emb, DiversitySpec(method=DiversityMethod.MMR, strength=0.2), 5, cats, cats) == [0, 1, 2, 3, 4]
    # ... and when it is strong enough to diversify, it does so right below the first item.
    assert select(rel, emb, DiversitySpec(method=DiversityMethod.MMR, strength=0.5), 5, cats, cats)[:2] == [0, 6]


def test_a_window_shows_its_items_in_relevance_order() -> None:
    rel, emb, cats = near_duplicates()
    for method in (DiversityMethod.MMR, DiversityMethod.MAX_SUM, DiversityMethod.DPP):
        spec = DiversitySpec(method=method, strength=0.5)
        picked = select(rel, emb, spec, 5, cats, cats)
        windowed = select(rel, emb, DiversitySpec(method=method, strength=0.5, window=5), 5, cats, cats)
        assert windowed == sorted(picked)  # the same items, best first
        assert windowed == sorted(windowed)


def test_windows_restart_the_redundancy_and_the_first_page_ignores_k() -> None:
    rel, emb, cats = near_duplicates()
    spec = DiversitySpec(method=DiversityMethod.MAX_SUM, strength=0.1, window=3)
    nine = select(rel, emb, spec, 9, cats, cats)
    assert nine[:3] == select(rel, emb, spec, 3, cats, cats)  # page 1 does not depend on how many follow
    assert sorted(nine) == list(range(9))
    for start in (0, 3, 6):
        page = nine[start : start + 3]
        assert page == sorted(page)


def test_a_window_of_one_is_relevance_order_and_caps_span_windows() -> None:
    rel, emb, cats = near_duplicates()
    one = DiversitySpec(method=DiversityMethod.MAX_SUM, strength=0.9, window=1)
    assert select(rel, emb, one, 5, cats, cats) == [0, 1, 2, 3, 4]
    capped = DiversitySpec(method=DiversityMethod.MAX_SUM, strength=0.1, window=2, max_per_category=2)
    chosen = select(rel, emb, capped, 9, cats, cats)
    assert [cats[i] for i in chosen].count("dup") == 2 and len(chosen) == 5  # the cap holds across windows
