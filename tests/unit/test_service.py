"""Request validation: every bad field gets INVALID_ARGUMENT naming the field, value and limit."""

from __future__ import annotations

import math

import grpc
import pytest

from ranker import errors
from ranker.config import Settings
from ranker.domain import DiversityMethod
from ranker.errors import InvalidArgument
from ranker.release import KnownIds
from ranker.service import to_query
from ranker.v1 import ranker_pb2

SETTINGS = Settings()
ROW_OF = {"a": 0, "b": 1}


def query(**kwargs: object) -> object:
    return to_query(ranker_pb2.RankRequest(**kwargs), SETTINGS, ROW_OF)


def test_defaults() -> None:
    q = query(query="drill")
    assert q.top_k == 20 and q.request_id and q.diversity is None and q.rules == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query": ""}, "query: must not be empty when candidate_ids is empty"),
        ({"query": "   "}, "query: must not be empty"),
        ({"query": "x", "top_k": 0}, "top_k: must be 1..200, got 0"),
        ({"query": "x", "top_k": 10_000}, "top_k: must be 1..200, got 10000"),
        ({"query": "x" * 1_048_576}, "query: must be at most 1000 characters, got 1048576"),
        ({"query": "x", "candidate_ids": ["a", "zzz"]}, "candidate_ids[1]: unknown item id 'zzz'"),
        ({"query": "x", "blend": {"weights": {"ranker": -1.0}}}, "blend.weights['ranker']"),
        ({"query": "x", "filters": {"min_price": math.nan}}, "filters.min_price: must be a finite number >= 0"),
        ({"query": "x", "filters": {"min_price": 5, "max_price": 2}}, "filters.min_price: must not exceed"),
        ({"query": "x", "diversity": {"strength": 1.5}}, "diversity.strength: must be in 0..1, got 1.5"),
        ({"query": "x", "diversity": {"max_per_brand": 500}}, "diversity.max_per_brand: must be 0..200, got 500"),
        ({"query": "x", "diversity": {"window": 201}}, "diversity.window: must be 0..200, got 201"),
        ({"query": "x", "request_id": "r" * 300}, "request_id: must be at most 256 characters, got 300"),
        ({"query": "x", "request_id": "r1\nforged"}, "request_id: must hold no control characters, got 'r1\\nforged'"),
    ],
)
def test_invalid_requests_name_the_field(kwargs: dict[str, object], message: str) -> None:
    if "blend" in kwargs:
        # Weights are checked against the policy in the pipeline; the service passes them through.
        from ranker.blending import DEFAULT_POLICY, apply_overrides

        q = query(**kwargs)
        with pytest.raises(InvalidArgument) as caught:
            apply_overrides(DEFAULT_POLICY, q.weights, max_weight=10.0)
    else:
        with pytest.raises(InvalidArgument) as caught:
            query(**kwargs)
    assert message in str(caught.value)


def test_candidates_alone_need_no_query() -> None:
    assert query(candidate_ids=["b", "a"]).candidate_ids == ("b", "a")


def test_every_error_class_has_a_status() -> None:
    import ranker.tritonserver  # noqa: F401 - defines a subclass of BackendUnavailable

    def subclasses(cls: type) -> list[type]:
        return [cls, *[s for sub in cls.__subclasses__() for s in subclasses(sub)]]

    assert set(errors.STATUS_CODES) == set(subclasses(errors.RankerError)) - {
        c for c in subclasses(errors.RankerError) if c.__module__ != "ranker.errors"
    }, "every class of errors.py has its own row"
    for cls in subclasses(errors.RankerError):
        expected_internal = cls is errors.RankerError
        assert (errors.status_for(cls) is grpc.StatusCode.INTERNAL) == expected_internal, cls
    assert errors.status_code(InvalidArgument("f", "m")) is grpc.StatusCode.INVALID_ARGUMENT
    assert errors.status_code(errors.BackendTimeout("t", "m")) is grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {"action": "RULE_ACTION_PIN", "item_ids": ["zz"], "position": 1},
            "rules[0].item_ids[0]: unknown item id 'zz'",
        ),
        ({"action": "RULE_ACTION_PIN", "item_ids": ["a"], "position": 0}, "rules[0].position: must be 1..200, got 0"),
        (
            {"action": "RULE_ACTION_BOOST", "item_ids": ["a"], "amount": math.nan},
            "rules[0].amount: must be in (0, 100]",
        ),
        ({"action": "RULE_ACTION_BURY", "field": "colour", "values": ["red"], "amount": 1}, "rules[0].field: must be"),
        ({"action": "RULE_ACTION_UNSPECIFIED", "item_ids": ["a"]}, "rules[0].action: must be one of"),
    ],
)
def test_invalid_rules_name_the_field(rule: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        query(query="x", rules=[rule])
    assert message in str(caught.value)


def test_valid_rules_and_diversity_defaults() -> None:
    q = query(
        query="x",
        rules=[{"action": "RULE_ACTION_EXCLUDE", "field": "brand", "values": ["Acme"]}],
        diversity={"max_per_brand": 2},
    )
    assert q.rules[0].action.value == "exclude" and q.rules[0].values == frozenset({"Acme"})
    assert q.diversity is not None and q.diversity.max_per_brand == 2
    named = query(query="x", diversity={"method": "DIVERSITY_METHOD_MMR"})
    assert named.diversity is not None and named.diversity.method is DiversityMethod.MMR
    assert named.diversity.strength == 0.3


def test_max_sum_and_window_come_through_with_the_policys_defaults() -> None:
    from ranker.domain import DiversitySpec
    from ranker.policy import Policy

    named = query(query="x", diversity={"method": "DIVERSITY_METHOD_MAX_SUM", "window": 10})
    assert named.diversity is not None and named.diversity.method is DiversityMethod.MAX_SUM
    assert named.diversity.strength == 0.04 and named.diversity.window == 10  # max-sum's own default strength
    assert query(query="x", diversity={"method": "DIVERSITY_METHOD_MMR"}).diversity.window == 0  # type: ignore[union-attr]
    policy = Policy(diversity=DiversitySpec(method=DiversityMethod.MAX_SUM, strength=0.05, window=10))
    window_only = to_query(ranker_pb2.RankRequest(query="x", diversity={"window": 5}), SETTINGS, ROW_OF, policy)
    assert window_only.diversity == DiversitySpec(method=DiversityMethod.MAX_SUM, strength=0.05, window=5)
    same_method = to_query(
        ranker_pb2.RankRequest(query="x", diversity={"method": "DIVERSITY_METHOD_MAX_SUM"}), SETTINGS, ROW_OF, policy
    )
    assert same_method.diversity == policy.diversity  # unset strength and window: the policy's
    unwindowed = to_query(
        ranker_pb2.RankRequest(query="x", diversity={"method": "DIVERSITY_METHOD_MAX_SUM", "window": 0}),
        SETTINGS,
        ROW_OF,
        policy,
    )
    assert unwindowed.diversity is not None and unwindowed.diversity.window == 0  # an explicit 0 is kept


def test_unset_caps_are_the_policys_when_the_method_is_the_policys() -> None:
    from ranker.domain import DiversitySpec
    from ranker.policy import Policy

    policy = Policy(diversity=DiversitySpec(method=DiversityMethod.MMR, strength=0.2, max_per_brand=1))

    def spec(**diversity: object) -> DiversitySpec | None:
        return to_query(ranker_pb2.RankRequest(query="x", diversity=diversity), SETTINGS, ROW_OF, policy).diversity

    # tuning only the strength keeps the policy's brand cap
    assert spec(strength=0.3) == DiversitySpec(method=DiversityMethod.MMR, strength=0.3, max_per_brand=1)
    assert spec(max_per_brand=0) == DiversitySpec(method=DiversityMethod.MMR, strength=0.2)  # an explicit 0: no cap
    assert spec(max_per_category=2) == DiversitySpec(
        method=DiversityMethod.MMR, strength=0.2, max_per_category=2, max_per_brand=1
    )
    assert spec(method="DIVERSITY_METHOD_DPP").max_per_brand == 0  # type: ignore[union-attr]  # another method


def test_ids_deleted_online_without_a_row_are_known() -> None:
    known = KnownIds(ROW_OF, frozenset({"gone"}))
    pin = {"action": ranker_pb2.RULE_ACTION_PIN, "item_ids": ["gone"], "position": 1}
    q = to_query(ranker_pb2.RankRequest(query="x", candidate_ids=["a", "gone"], rules=[pin]), SETTINGS, known)
    assert q.candidate_ids == ("a", "gone") and q.rules[0].item_ids == {"gone"}
    with pytest.raises(InvalidArgument, match=r"candidate_ids\[1\]: unknown item id 'never'"):
        to_query(ranker_pb2.RankRequest(query="x", candidate_ids=["a", "never"]), SETTINGS, known)


def test_a_pin_may_go_as_deep_as_the_server_shows() -> None:
    pin = {"action": ranker_pb2.RULE_ACTION_PIN, "item_ids": ["a"], "position": 700}
    deep = Settings(max_top_k=1000)
    assert to_query(ranker_pb2.RankRequest(query="x", rules=[pin]), deep, ROW_OF).rules[0].position == 700
    with pytest.raises(InvalidArgument, match=r"rules\[0\].position: must be 1..200, got 700"):
        to_query(ranker_pb2.RankRequest(query="x", rules=[pin]), SETTINGS, ROW_OF)
