"""offline.train_encoder's pure parts: what is trained on, which negatives, the graded loss, the data order."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from offline import data
from offline.train_encoder import (
    Example,
    QueryPlan,
    TrainConfig,
    batch_documents,
    build_plans,
    dense_top,
    epoch_batches,
    graded_infonce,
    judged_train_queries,
    mine_pool,
)

ROWS = {f"sku-{i}": i for i in range(50)}


def judgments(rows: list[tuple[str, str, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"query": pl.Utf8, "item_id": pl.Utf8, "relevance": pl.Float64}, orient="row")


def many_queries(n: int = 60) -> pl.DataFrame:
    rows = []
    for q in range(n):
        rows += [(f"query {q}", f"sku-{q % 50}", 3.0), (f"query {q}", f"sku-{(q + 1) % 50}", 2.33)]
        rows.append((f"query {q}", f"sku-{(q + 2) % 50}", 1.0))
    return judgments(rows)


def test_training_sees_only_train_queries() -> None:
    split = data.split_queries(many_queries(), seed=13)
    dev = set(split.dev["query"].to_list())
    assert dev, "the fixture must put some queries in dev"
    judged = judged_train_queries(split.train, ROWS)
    plans = build_plans(judged, {})
    assert {p.query for p in plans}.isdisjoint(dev)
    config = TrainConfig(batch_size=8)
    seen = {e.query for b in epoch_batches(plans, 0, config, 50) for e in b}
    assert seen == set(split.train["query"].unique().to_list())


def test_judged_items_missing_from_the_catalog_are_dropped() -> None:
    judged = judged_train_queries(judgments([("q", "sku-1", 3.0), ("q", "gone", 3.0)]), ROWS)
    assert judged == {"q": {1: 3.0}}


def test_mined_pool_skips_top_ranks_excludes_judged_items_and_interleaves() -> None:
    judged = {5: 3.0, 7: 1.0, 12: 2.0}
    bm25 = [1, 2, 3, 5, 7, 8, 9, 10]
    dense = [20, 21, 12, 22, 8, 23]
    pool = mine_pool(judged, [bm25, dense], depth=3, skip=2)
    assert pool == [3, 22, 8, 9, 23]  # bm25 [3, 8, 9] and dense [22, 8, 23], interleaved, 8 once
    assert not set(pool) & set(judged)


def test_plans_use_grades_and_never_make_a_judged_item_a_mined_negative() -> None:
    judged = {"drill": {1: 3.0, 2: 2.0, 3: 1.67, 4: 1.0, 5: 2.67}, "nothing relevant": {6: 1.0}}
    plans = build_plans(judged, {"drill": [3, 9, 1, 10], "nothing relevant": [7]})
    assert [p.query for p in plans] == ["drill"]  # a query without a relevant item cannot be trained on
    (plan,) = plans
    assert [row for row, _ in plan.positives] == [1, 5, 2]  # relevance ≥ 2, by gain
    assert np.allclose([gain for _, gain in plan.positives], [2.0, 1.67, 1.0])  # gain = relevance − 1
    assert plan.judged_negatives == (4, 3)  # relevance < 2, least relevant first
    assert plan.mined == (9, 10)
    assert plan.relevant == {1, 2, 5}


def plan_for(query: str, positives: tuple[tuple[int, float], ...], judged_neg: tuple[int, ...], mined: tuple[int, ...]):
    return QueryPlan(
        query=query,
        positives=positives,
        judged_negatives=judged_neg,
        mined=mined,
        relevant=frozenset(r for r, _ in positives),
    )


def test_negatives_take_a_judged_one_first_then_mined_and_never_a_relevant_item() -> None:
    plans = [plan_for(f"q{i}", ((i, 2.0), (i + 100, 1.0)), (200 + i,), (300 + i, 400 + i, 500 + i)) for i in range(20)]
    config = TrainConfig(batch_size=4, hard_negatives=3, judged_negatives=1)
    for epoch in range(3):
        for batch in epoch_batches(plans, epoch, config, num_items=1000):
            for e in batch:
                plan = next(p for p in plans if p.query == e.query)
                assert len(e.negatives) == 3
                assert e.negatives[0] in plan.judged_negatives
                assert set(e.negatives[1:]) <= set(plan.mined)
                assert not set(e.negatives) & plan.relevant
                assert (e.positive, e.gain) in plan.positives


def test_short_pools_are_filled_with_random_items_that_are_not_relevant() -> None:
    plans = [plan_for("q", ((0, 2.0), (1, 1.0)), (), ())]
    (batch,) = epoch_batches(plans, 0, TrainConfig(hard_negatives=3), num_items=6)
    (example,) = batch
    assert len(set(example.negatives)) == 3 and not set(example.negatives) & {0, 1}


def test_data_order_is_a_function_of_seed_and_epoch_only() -> None:
    plans = [plan_for(f"q{i}", ((i, 2.0), (i + 100, 1.0)), (200 + i,), tuple(range(300, 320))) for i in range(40)]
    config = TrainConfig(batch_size=8, seed=13)
    first = epoch_batches(plans, 1, config, 1000)
    assert first == epoch_batches(plans, 1, config, 1000)  # a resumed run sees the same batches
    assert [len(b) for b in first] == [8] * 5
    assert first != epoch_batches(plans, 2, config, 1000)
    assert first != epoch_batches(plans, 1, TrainConfig(batch_size=8, seed=14), 1000)
    assert sorted(e.query for b in first for e in b) == sorted(p.query for p in plans)  # each query once


def example(query: str, positive: int, relevant: set[int], negatives: tuple[int, ...] = (), gain: float = 1.0):
    return Example(query=query, positive=positive, gain=gain, negatives=negatives, relevant=frozenset(relevant))


def test_relevant_items_of_a_query_are_not_its_in_batch_negatives() -> None:
    batch = [example("a", 1, {1, 2}, (10,)), example("b", 2, {2}, (1,))]
    docs, mask = batch_documents(batch)
    assert docs == [1, 2, 10, 1]
    # Row "a": item 2 (b's positive) is relevant for "a", and item 1 again as b's negative is a's own positive.
    assert mask.tolist() == [[False, True, False, True], [False, False, False, False]]


def test_loss_weights_rows_by_gain() -> None:
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    docs = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [1.0, 0.9]]), dim=1)
    none = torch.zeros(2, 2, dtype=torch.bool)
    per_row = torch.nn.functional.cross_entropy(20 * queries @ docs.T, torch.arange(2), reduction="none")
    assert per_row[0] > per_row[1]
    even = graded_infonce(queries, docs, torch.tensor([1.0, 1.0]), none, 20.0)
    exact_first = graded_infonce(queries, docs, torch.tensor([2.0, 1.0]), none, 20.0)
    exact_second = graded_infonce(queries, docs, torch.tensor([1.0, 2.0]), none, 20.0)
    assert torch.isclose(even, per_row.mean())
    assert torch.isclose(exact_first, (2 * per_row[0] + per_row[1]) / 3)
    assert exact_first > even > exact_second  # the exact pair's (larger) loss counts twice


def test_masked_columns_do_not_count_as_negatives() -> None:
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    docs = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0]]), dim=1)
    mask = torch.tensor([[False, False, True], [False, False, False]])
    gains = torch.ones(2)
    masked = graded_infonce(queries, docs, gains, mask, 20.0)
    ce = torch.nn.functional.cross_entropy
    row0 = ce(20 * queries[:1] @ docs[:2].T, torch.tensor([0]))  # row 0 without the masked column
    row1 = ce(20 * queries[1:] @ docs.T, torch.tensor([1]))
    assert torch.isclose(masked, (row0 + row1) / 2)
    assert masked < graded_infonce(queries, docs, gains, torch.zeros(2, 3, dtype=torch.bool), 20.0)


def test_dense_top_is_exact_and_breaks_ties_by_row() -> None:
    items = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    top = dense_top(np.array([[1.0, 0.0]], dtype=np.float32), items, 3)
    assert top.tolist() == [[0, 2, 3]]
