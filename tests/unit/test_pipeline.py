"""The Rank pipeline over fakes: ordering, rerank mode, filters, caps, degradation, breakdowns."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from ranker.domain import DiversityMethod, DiversitySpec, RankQuery, Rule, RuleAction
from ranker.errors import BackendFailed, BackendTimeout, BackendUnavailable, CircuitOpen, InvalidArgument
from ranker.observability import degraded_reason_codes
from ranker.pipeline import PipelineSettings, Ranker, check_candidate_ids
from tests.unit.fakes import SEARCH_STAGES, FakeEncoder, FakeScorer, FakeTokenizer, tiny_release


def make_ranker(*, encoder_fails: bool = False, scorer_fails: bool = False, depth: int = 5) -> Ranker:
    tokenizer = FakeTokenizer()
    return Ranker(
        tiny_release(),
        encoder=FakeEncoder(tokenizer.texts, fail=encoder_fails),
        scorer=FakeScorer(fail=scorer_fails),
        tokenizer=tokenizer,  # type: ignore[arg-type]
        settings=PipelineSettings(dense_k=depth, lexical_k=depth),
    )


def rank(ranker: Ranker, **kwargs: object) -> object:
    query = RankQuery(request_id="r1", **{"query": "cordless drill", "top_k": 5, **kwargs})  # type: ignore[arg-type]
    return asyncio.run(ranker.rank(query))


def test_drill_query_puts_drills_first() -> None:
    result = rank(make_ranker())
    ids = [item.item_id for item in result.items]
    assert set(ids[:3]) <= {"d1", "d2", "d3", "d4"}
    assert "p1" not in ids[:3]
    assert not result.degraded
    assert result.model_versions == {"text_encoder": "3", "ranker": "5"}
    assert [stage for stage, _ in result.timings_ms] == SEARCH_STAGES


def test_scores_are_non_increasing_and_breakdowns_sum_to_the_score() -> None:
    result = rank(make_ranker(), top_k=8)
    scores = [item.score for item in result.items]
    assert scores == sorted(scores, reverse=True)
    for item in result.items:
        assert sum(c.contribution for c in item.breakdown) == pytest.approx(item.score, abs=1e-9)


def test_candidate_ids_rerank_exactly_those_items() -> None:
    result = rank(make_ranker(), candidate_ids=("p1", "d2", "h1"), top_k=10)
    assert sorted(item.item_id for item in result.items) == ["d2", "h1", "p1"]
    assert result.items[0].item_id == "d2"


def test_rerank_does_not_depend_on_the_order_of_candidate_ids() -> None:
    # by the retrieval fusion alone, whose per-signal orders have ties among these items
    answers = {
        tuple(
            (item.item_id, item.score)
            for item in rank(
                make_ranker(), query="hose", candidate_ids=ids, weights={"ranker": 0.0, "retrieval": 1.0}
            ).items
        )
        for ids in itertools.permutations(("d1", "d2", "d3", "p1"))
    }
    assert len(answers) == 1


def test_filters_restrict_category_and_price() -> None:
    result = rank(make_ranker(), categories=frozenset({"power tools"}), max_price=130.0, top_k=10)
    ids = {item.item_id for item in result.items}
    assert ids and ids <= {"d1", "d3", "d4"}


def test_unknown_price_never_passes_a_price_filter() -> None:
    result = rank(make_ranker(), query="paint", min_price=0.0, top_k=10)
    assert "p2" not in {item.item_id for item in result.items}


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BackendUnavailable("triton:ranker", "connection refused"), "ranker_unavailable"),
        (BackendTimeout("triton:ranker", "deadline"), "ranker_timeout"),
        (BackendFailed("triton:ranker", "bad input"), "ranker_failed"),
        (CircuitOpen("triton:ranker", "circuit open after repeated failures"), "ranker_circuit_open"),
    ],
)
def test_the_degraded_reason_tells_how_the_model_call_failed(error: Exception, code: str) -> None:
    ranker = make_ranker()

    async def fail(features: object, *, timeout: float | None) -> object:
        raise error

    ranker.scorer.score = fail  # type: ignore[method-assign]
    result = rank(ranker)
    assert result.degraded and degraded_reason_codes(result.degraded_reason) == [code]


def test_encoder_down_answers_lexically_and_says_so() -> None:
    result = rank(make_ranker(encoder_fails=True))
    assert result.degraded
    assert "text_encoder" in result.degraded_reason
    assert result.items and result.items[0].item_id.startswith("d")


def test_ranker_down_falls_back_to_retrieval_order() -> None:
    result = rank(make_ranker(scorer_fails=True))
    assert result.degraded and "ranker" in result.degraded_reason
    assert {c.name for c in result.items[0].breakdown} >= {"retrieval"}


def test_brand_cap_holds_in_the_top_k() -> None:
    spec = DiversitySpec(method=DiversityMethod.MMR, strength=0.5, max_per_brand=1)
    result = rank(make_ranker(), diversity=spec, top_k=8)
    brands = [
        result_brand for result_brand in (tiny_release().catalog.brands[i.row] for i in result.items) if result_brand
    ]
    assert len(brands) == len(set(brands))


def test_weight_override_changes_the_order() -> None:
    base = rank(make_ranker(), query="dewalt drill", top_k=8)
    lexical = rank(make_ranker(), query="dewalt drill", top_k=8, weights={"ranker": 0.0, "lexical": 1.0})
    assert lexical.items[0].item_id in {"d1", "d4", "b1"}
    assert lexical.items[0].breakdown != base.items[0].breakdown


def test_unknown_weight_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match=r"blend.weights\['likes'\]"):
        rank(make_ranker(), weights={"likes": 1.0})


def test_candidate_id_checks_name_the_index() -> None:
    with pytest.raises(InvalidArgument, match=r"candidate_ids\[1\]: unknown item id 'nope'"):
        check_candidate_ids(("d1", "nope"), {"d1": 0}, 10)
    with pytest.raises(InvalidArgument, match=r"candidate_ids\[1\]: duplicate"):
        check_candidate_ids(("d1", "d1"), {"d1": 0}, 10)
    with pytest.raises(InvalidArgument, match="at most 1 ids, got 2"):
        check_candidate_ids(("d1", "d1"), {"d1": 0}, 1)


def test_max_sum_by_windows_keeps_scores_ordered_and_breakdowns_summing() -> None:
    spec = DiversitySpec(method=DiversityMethod.MAX_SUM, strength=0.3, window=4)
    result = rank(make_ranker(), diversity=spec, top_k=8)
    scores = [item.score for item in result.items]
    assert scores == sorted(scores, reverse=True)
    for item in result.items:
        assert sum(c.contribution for c in item.breakdown) == pytest.approx(item.score, abs=1e-9)
    again = rank(make_ranker(), diversity=spec, top_k=8)
    assert [i.item_id for i in again.items] == [i.item_id for i in result.items]  # deterministic


def test_a_rerank_pin_moves_one_of_the_given_items_and_adds_none() -> None:
    # The contract of candidate_ids: rerank exactly these items. A pin of another item is skipped, and it
    # does not take its position from a later pin of a given item.
    outside = Rule(action=RuleAction.PIN, item_ids=frozenset({"p1"}), position=1)
    inside = Rule(action=RuleAction.PIN, item_ids=frozenset({"h1"}), position=1)
    result = rank(make_ranker(), query="drill", candidate_ids=("d1", "d2", "h1"), rules=(outside, inside))
    ids = [item.item_id for item in result.items]
    assert ids[0] == "h1" and sorted(ids) == ["d1", "d2", "h1"] and result.candidates == 3
    alone = rank(make_ranker(), query="drill", candidate_ids=("d1", "d2"), rules=(outside,))
    assert {item.item_id for item in alone.items} == {"d1", "d2"} and alone.candidates == 2


def order_key_holds(items: object) -> bool:
    """The documented order: by score, ties by item_id."""
    pairs = [(item.score, item.item_id) for item in items]  # type: ignore[attr-defined]
    return pairs == sorted(pairs, key=lambda p: (-p[0], p[1]))


@pytest.mark.parametrize("window", [0, 4])
def test_pins_count_against_the_caps_and_keep_scores_ordered(window: int) -> None:
    """A pinned item's brand fills its cap like any other item's, so the page never exceeds the cap while the
    pins alone stay within it; scores follow the shown order, ties by item id; breakdowns sum."""
    catalog = tiny_release().catalog
    for pinned, position in itertools.product(("d1", "d2", "b1", "p1", "h1"), (1, 3)):
        pin = Rule(action=RuleAction.PIN, item_ids=frozenset({pinned}), position=position)
        spec = DiversitySpec(method=DiversityMethod.MMR, strength=0.5, max_per_brand=1, window=window)
        result = rank(make_ranker(), diversity=spec, rules=(pin,), top_k=8)
        brands = [catalog.brands[item.row] for item in result.items if catalog.brands[item.row]]
        assert len(brands) == len(set(brands)), (pinned, position, brands)
        assert result.items[position - 1].item_id == pinned
        assert order_key_holds(result.items)
        for item in result.items:
            assert sum(c.contribution for c in item.breakdown) == pytest.approx(item.score, abs=1e-9)


def test_ties_are_shown_by_item_id_after_diversity_and_pins() -> None:
    for query, spec, rules in itertools.product(
        ("cordless drill", "paint", "garden hose"),
        (DiversitySpec(), DiversitySpec(method=DiversityMethod.MMR, strength=0.1)),
        ((), (Rule(action=RuleAction.PIN, item_ids=frozenset({"d1"}), position=3),)),
    ):
        for candidate_ids in ((), ("d1", "p1", "h1", "p2")):
            result = rank(make_ranker(), query=query, diversity=spec, rules=rules, candidate_ids=candidate_ids)
            assert order_key_holds(result.items), (query, spec, rules, candidate_ids)


def test_with_pins_the_first_window_is_the_same_whatever_top_k() -> None:
    pin = Rule(action=RuleAction.PIN, item_ids=frozenset({"h1"}), position=2)
    spec = DiversitySpec(method=DiversityMethod.MMR, strength=0.9, window=4)
    ranker = make_ranker(depth=8)  # every top_k below within the candidate depth: the same candidates
    for query in ("cordless drill", "paint", "dewalt"):
        pages = [[i.item_id for i in rank(ranker, query=query, diversity=spec, rules=(pin,), top_k=k).items]
                 for k in (4, 6, 8)]  # fmt: skip
        assert pages[0] == pages[1][:4] == pages[2][:4], (query, pages)


def test_a_page_longer_than_the_candidate_depth_retrieves_deeper() -> None:
    shallow = make_ranker(depth=2)
    assert len(rank(shallow, query="drill", top_k=2).items) == 2
    page = rank(shallow, query="drill", top_k=7)
    assert len(page.items) == 7 and page.candidates >= 7  # not only the 2 + 2 the settings name
