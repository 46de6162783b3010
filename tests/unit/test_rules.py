"""Business rules and catalog signals through the pipeline: exclude, boost, bury, pin, price."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from ranker import rules
from ranker.domain import DiversityMethod, DiversitySpec, RankQuery, RankResult, Rule, RuleAction
from ranker.pipeline import PipelineSettings, Ranker
from ranker.policy import Policy
from tests.unit.fakes import FakeEncoder, FakeScorer, FakeTokenizer, tiny_release


def run(query: str = "cordless drill", policy: Policy | None = None, **kwargs: object) -> RankResult:
    tokenizer = FakeTokenizer()
    release = tiny_release()
    if policy is not None:
        release = replace(release, policy=policy)
    ranker = Ranker(
        release,
        encoder=FakeEncoder(tokenizer.texts),
        scorer=FakeScorer(),
        tokenizer=tokenizer,  # type: ignore[arg-type]
        settings=PipelineSettings(dense_k=8, lexical_k=8),
    )
    return asyncio.run(ranker.rank(RankQuery(request_id="r", query=query, **{"top_k": 8, **kwargs})))  # type: ignore[arg-type]


def ids(result: RankResult) -> list[str]:
    return [item.item_id for item in result.items]


def assert_explained(result: RankResult) -> None:
    scores = [item.score for item in result.items]
    assert scores == sorted(scores, reverse=True)
    for item in result.items:
        assert sum(c.contribution for c in item.breakdown) == pytest.approx(item.score, abs=1e-9)


def test_exclude_by_brand_removes_every_item_of_the_brand() -> None:
    result = run(rules=(Rule(action=RuleAction.EXCLUDE, field="brand", values=frozenset({"DEWALT"})),))
    assert not {"d1", "d4", "b1"} & set(ids(result))
    assert ids(result)


def test_boost_by_category_lifts_it_and_shows_in_the_breakdown() -> None:
    plain = run()
    boosted = run(rules=(Rule(action=RuleAction.BOOST, field="category", values=frozenset({"paint"}), amount=50.0),))
    assert ids(plain)[0].startswith("d") and ids(boosted)[0].startswith("p")
    part = {c.name: c.contribution for c in boosted.items[0].breakdown}
    assert part["rules"] == 50.0
    assert_explained(boosted)


def test_bury_by_id_drops_the_item() -> None:
    top = ids(run())[0]
    buried = run(rules=(Rule(action=RuleAction.BURY, item_ids=frozenset({top}), amount=50.0),))
    assert ids(buried)[-1] == top


def test_pin_takes_its_position_survives_caps_and_keeps_scores_ordered() -> None:
    spec = DiversitySpec(method=DiversityMethod.MMR, strength=0.5, max_per_category=1)
    pin = Rule(action=RuleAction.PIN, item_ids=frozenset({"h1"}), position=2)
    result = run(rules=(pin,), diversity=spec)
    assert ids(result)[1] == "h1"
    assert {c.name for c in result.items[1].breakdown} >= {"pin"}
    assert_explained(result)


def pin(item_id: str, position: int) -> Rule:
    return Rule(action=RuleAction.PIN, item_ids=frozenset({item_id}), position=position)


def test_adjacent_pins_keep_scores_ordered_whatever_their_own_scores() -> None:
    order = ids(run())
    # the weakest item pinned just above the strongest one: two pins in a row with rising own scores
    result = run(rules=(pin(order[-1], 2), pin(order[0], 3)))
    assert ids(result)[1:3] == [order[-1], order[0]]
    assert_explained(result)


def test_pin_past_top_k_is_not_shown_and_takes_no_place() -> None:
    plain = ids(run(top_k=4))
    assert ids(run(top_k=4, rules=(pin("p2", 50),))) == plain


def test_pin_of_a_filtered_item_is_not_shown() -> None:
    pin = Rule(action=RuleAction.PIN, item_ids=frozenset({"h1"}), position=1)
    result = run(rules=(pin,), categories=frozenset({"power tools"}))
    assert "h1" not in ids(result)


def test_policy_rules_apply_to_every_request() -> None:
    policy = Policy(rules=(Rule(action=RuleAction.EXCLUDE, item_ids=frozenset({"d1"})),))
    assert "d1" not in ids(run(policy=policy))


def test_price_signal_orders_cheapest_first_with_unknown_prices_last() -> None:
    result = run("paint", weights={"ranker": 0.0, "price": 1.0}, categories=frozenset({"paint"}))
    assert ids(result) == ["p1", "p2"]  # p2 has no price: treated as the worst
    assert_explained(result)


def test_in_stock_only_without_stock_data_returns_nothing() -> None:
    assert ids(run(in_stock_only=True)) == []


def test_place_and_pin_scores() -> None:
    order, shown = rules.place([10, 11, 12], [(1, 20), (9, 21)], k=4)
    assert order == [20, 10, 11, 12] and shown == {20}
    assert rules.pin_scores(np.array([0.1, 0.9, 0.5]), [True, False, False]).tolist() == [0.9 + 1e-6, 0.9, 0.5]
    assert rules.pin_scores(np.array([0.9, 2.0, 0.5]), [False, True, False]).tolist() == [0.9, 0.9, 0.5]
    # a pin past the end of a shorter list goes last; one past k is not shown
    assert rules.place([10, 11], [(3, 20), (9, 21)], k=3) == ([10, 11, 20], {20})
    # a run of pins keeps its placed order: each at most its predecessor, at least its successor
    got = rules.pin_scores(np.array([0.9, 0.1, 2.0, 0.5]), [False, True, True, False]).tolist()
    assert got == [0.9, 0.9, 0.9, 0.5]
