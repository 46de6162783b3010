"""offline.metrics against hand-computed values (gain = relevance − 1, unjudged = 0)."""

from __future__ import annotations

import math

import pytest

from offline import metrics

JUDGED = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 2.5}  # gains 2, 1, 0, 1.5; relevant: a, b, d


def test_ndcg_perfect_order_is_one() -> None:
    assert metrics.ndcg_at_k(["a", "d", "b", "c"], JUDGED, k=10) == pytest.approx(1.0)


def test_ndcg_hand_computed() -> None:
    # ranked b, x (unjudged), a: DCG = 1/log2(2) + 0 + 2/log2(4) = 2
    # ideal a, d, b:            IDCG = 2 + 1.5/log2(3) + 1/log2(4)
    ideal = 2 + 1.5 / math.log2(3) + 0.5
    assert metrics.ndcg_at_k(["b", "x", "a"], JUDGED, k=10) == pytest.approx(2 / ideal)


def test_ndcg_ideal_uses_all_judged_items_not_only_retrieved() -> None:
    # Retrieving only b, in first place, is not perfect: a and d were missed.
    assert metrics.ndcg_at_k(["b"], JUDGED, k=10) == pytest.approx(1 / (2 + 1.5 / math.log2(3) + 0.5))


def test_ndcg_cutoff() -> None:
    # k=1: ranked [b] -> 1 / ideal [a] -> 2
    assert metrics.ndcg_at_k(["b", "a"], JUDGED, k=1) == pytest.approx(0.5)


def test_ndcg_counts_an_item_shown_twice_once() -> None:
    # The ideal list holds each judged item once, so repeats must not push NDCG above 1.
    assert metrics.ndcg_at_k(["a", "a", "d", "b"], JUDGED, k=10) == pytest.approx(
        (2 + 1.5 / math.log2(4) + 1 / math.log2(5)) / (2 + 1.5 / math.log2(3) + 0.5)
    )
    assert metrics.ndcg_at_k(["a"] * 10, JUDGED, k=10) < 1.0


def test_ndcg_without_gain_is_zero() -> None:
    assert metrics.ndcg_at_k(["c"], {"c": 1.0}, k=10) == 0.0
    assert metrics.ndcg_at_k([], JUDGED, k=10) == 0.0


def test_recall_hand_computed() -> None:
    assert metrics.recall_at_k(["a", "c", "x", "d"], JUDGED, k=100) == pytest.approx(2 / 3)
    assert metrics.recall_at_k(["c", "x", "a"], JUDGED, k=2) == 0.0
    assert metrics.recall_at_k(["a"], {"c": 1.0}, k=10) == 0.0


def test_reciprocal_rank() -> None:
    assert metrics.reciprocal_rank(["c", "x", "d", "a"], JUDGED) == pytest.approx(1 / 3)
    assert metrics.reciprocal_rank(["c", "x"], JUDGED) == 0.0
    assert metrics.reciprocal_rank(["c", "x", "d"], JUDGED, k=2) == 0.0


def test_qualifies_needs_three_relevant() -> None:
    assert metrics.qualifies(JUDGED)
    assert not metrics.qualifies({"a": 3.0, "b": 2.0, "c": 1.9})


def test_evaluate_averages_over_qualifying_queries_only() -> None:
    judgments = {"q1": JUDGED, "q2": {"a": 3.0}, "q3": {"a": 3.0, "b": 3.0, "c": 2.0}}
    runs = {"q1": ["a", "d", "b"], "q2": ["a"]}  # q3 has no run: an empty list
    result = metrics.evaluate(runs, judgments, ndcg_k=10, recall_k=100)
    assert result == pytest.approx({"queries": 2, "ndcg@10": 0.5, "recall@100": 0.5, "mrr": 0.5})


def test_bootstrap_ci_brackets_the_mean_and_is_seeded() -> None:
    import numpy as np

    from offline.metrics import bootstrap_ci

    values = np.random.default_rng(1).uniform(size=500)
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_ci(values)
    narrow = bootstrap_ci(np.tile(values, 10))
    assert narrow[1] - narrow[0] < high - low
    assert bootstrap_ci(np.full(20, 0.4)) == (pytest.approx(0.4), pytest.approx(0.4))


def test_per_query_lists_qualifying_queries_only() -> None:
    from offline.metrics import per_query

    judged = {"q1": {"a": 3.0, "b": 2.0, "c": 2.5}, "q2": {"a": 1.0}}
    values = per_query({"q1": ["a", "b", "c"]}, judged)
    assert {k: len(v) for k, v in values.items()} == {"ndcg@10": 1, "recall@100": 1, "mrr": 1}
    assert values["recall@100"][0] == 1.0
