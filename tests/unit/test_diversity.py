"""Diversity selectors: caps, MMR and DPP trade relevance for variety, deterministically."""

from __future__ import annotations

import numpy as np

from ranker.diversity import monotone_scores, select
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


def test_dpp_with_tiny_strength_is_relevance_order() -> None:
    rel, emb, cats = clustered()
    chosen = select(rel, emb, DiversitySpec(method=DiversityMethod.DPP, strength=0.01), 4, cats, cats)
    assert chosen == [0, 1, 2, 3]


def test_monotone_scores_only_lowers_promoted_items() -> None:
    assert monotone_scores(np.array([1.0, 0.5, 0.8])).tolist() == [1.0, 0.5, 0.5 - 1e-6]
    assert monotone_scores(np.array([1.0, 1.0, 0.2])).tolist() == [1.0, 1.0, 0.2]
