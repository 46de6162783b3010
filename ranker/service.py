"""Protobuf <-> domain glue for the Ranker gRPC service: validation in, results out, errors mapped.

Nothing else in the service touches generated protobuf classes.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Mapping

import grpc

from ranker.config import Settings
from ranker.domain import DiversityMethod, DiversitySpec, RankQuery, RankResult, Rule, RuleAction
from ranker.errors import InvalidArgument, RankerError, status_code
from ranker.pipeline import Ranker, check_candidate_ids
from ranker.policy import DEFAULT, Policy, make_rule
from ranker.v1 import ranker_pb2, ranker_pb2_grpc

log = logging.getLogger(__name__)

_METHODS = {
    ranker_pb2.DIVERSITY_METHOD_UNSPECIFIED: DiversityMethod.NONE,
    ranker_pb2.DIVERSITY_METHOD_NONE: DiversityMethod.NONE,
    ranker_pb2.DIVERSITY_METHOD_MMR: DiversityMethod.MMR,
    ranker_pb2.DIVERSITY_METHOD_DPP: DiversityMethod.DPP,
}
_ACTIONS = {
    ranker_pb2.RULE_ACTION_PIN: RuleAction.PIN,
    ranker_pb2.RULE_ACTION_EXCLUDE: RuleAction.EXCLUDE,
    ranker_pb2.RULE_ACTION_BOOST: RuleAction.BOOST,
    ranker_pb2.RULE_ACTION_BURY: RuleAction.BURY,
}
MAX_ID_CHARS = 256
MAX_CATEGORIES = 100
MAX_RULES = 50
DEFAULT_STRENGTH = 0.3  # a method named without a strength


def _check_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters, got {len(value)}")


def _check_price(field: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(field, f"must be a finite number >= 0, got {value!r}")


def _diversity(request: ranker_pb2.RankRequest, max_top_k: int, policy: Policy) -> DiversitySpec | None:
    """The request's diversity, or None for the policy's default. An unspecified method with caps or a
    strength keeps the policy's method."""
    d = request.diversity
    if d.method not in _METHODS:
        raise InvalidArgument("diversity.method", f"unknown method {d.method}; known: {sorted(_METHODS)}")
    strength = d.strength if d.HasField("strength") else None
    if strength is not None and (not math.isfinite(strength) or not 0.0 <= strength <= 1.0):
        raise InvalidArgument("diversity.strength", f"must be in 0..1, got {strength!r}")
    for name in ("max_per_category", "max_per_brand"):
        cap = getattr(d, name)
        if cap > max_top_k:
            raise InvalidArgument(f"diversity.{name}", f"must be 0..{max_top_k}, got {cap}")
    if d.method == ranker_pb2.DIVERSITY_METHOD_UNSPECIFIED:
        if strength is None and not d.max_per_category and not d.max_per_brand:
            return None
        method = policy.diversity.method
    else:
        method = _METHODS[d.method]
    if strength is None:
        strength = policy.diversity.strength if method is policy.diversity.method else DEFAULT_STRENGTH
    return DiversitySpec(
        method=method, strength=strength, max_per_category=d.max_per_category, max_per_brand=d.max_per_brand
    )


def _rules(request: ranker_pb2.RankRequest, row_of: Mapping[str, int], policy: Policy) -> tuple[Rule, ...]:
    if len(request.rules) > MAX_RULES:
        raise InvalidArgument("rules", f"at most {MAX_RULES} rules, got {len(request.rules)}")
    result = []
    for i, rule in enumerate(request.rules):
        where = f"rules[{i}]"
        if rule.action not in _ACTIONS:
            raise InvalidArgument(f"{where}.action", f"must be one of {sorted(_ACTIONS)}, got {rule.action}")
        for j, item_id in enumerate(rule.item_ids):
            if item_id not in row_of:
                raise InvalidArgument(f"{where}.item_ids[{j}]", f"unknown item id {item_id[:64]!r}")
        if len(rule.values) > MAX_CATEGORIES:
            raise InvalidArgument(f"{where}.values", f"at most {MAX_CATEGORIES} values, got {len(rule.values)}")
        result.append(
            make_rule(
                where,
                action=_ACTIONS[rule.action],
                item_ids=frozenset(rule.item_ids),
                field=rule.field,
                values=frozenset(rule.values),
                amount=rule.amount,
                position=rule.position,
                max_amount=policy.max_rule_amount,
            )
        )
    return tuple(result)


def to_query(
    request: ranker_pb2.RankRequest, settings: Settings, row_of: Mapping[str, int], policy: Policy = DEFAULT
) -> RankQuery:
    """Validate a RankRequest; every violation names the field, the value and the limit."""
    _check_length("request_id", request.request_id, MAX_ID_CHARS)
    _check_length("query", request.query, settings.max_query_chars)
    if request.HasField("user_id"):
        _check_length("user_id", request.user_id, MAX_ID_CHARS)
    candidate_ids = tuple(request.candidate_ids)
    check_candidate_ids(candidate_ids, row_of, settings.max_candidate_ids)
    if not request.query.strip() and not candidate_ids:
        raise InvalidArgument("query", "must not be empty when candidate_ids is empty")
    top_k = request.top_k if request.HasField("top_k") else settings.default_top_k
    if not 1 <= top_k <= settings.max_top_k:
        raise InvalidArgument("top_k", f"must be 1..{settings.max_top_k}, got {top_k}")

    filters = request.filters
    if len(filters.categories) > MAX_CATEGORIES:
        raise InvalidArgument("filters.categories", f"at most {MAX_CATEGORIES} values, got {len(filters.categories)}")
    for i, category in enumerate(filters.categories):
        _check_length(f"filters.categories[{i}]", category, MAX_ID_CHARS)
    min_price = filters.min_price if filters.HasField("min_price") else None
    max_price = filters.max_price if filters.HasField("max_price") else None
    if min_price is not None:
        _check_price("filters.min_price", min_price)
    if max_price is not None:
        _check_price("filters.max_price", max_price)
    if min_price is not None and max_price is not None and min_price > max_price:
        raise InvalidArgument("filters.min_price", f"must not exceed max_price {max_price!r}, got {min_price!r}")

    return RankQuery(
        request_id=request.request_id or uuid.uuid4().hex,
        query=request.query,
        top_k=top_k,
        user_id=request.user_id if request.HasField("user_id") else None,
        candidate_ids=candidate_ids,
        categories=frozenset(filters.categories),
        min_price=min_price,
        max_price=max_price,
        in_stock_only=filters.in_stock_only,
        weights=dict(request.blend.weights),
        diversity=_diversity(request, settings.max_top_k, policy),
        rules=_rules(request, row_of, policy),
    )


def _price(value: float) -> float | None:
    return None if math.isnan(value) else value


def to_response(result: RankResult, ranker: Ranker) -> ranker_pb2.RankResponse:
    catalog = ranker.release.catalog
    response = ranker_pb2.RankResponse(
        request_id=result.request_id,
        release=ranker_pb2.ReleaseInfo(release_id=result.release_id, model_versions=dict(result.model_versions)),
        timings=[ranker_pb2.StageTiming(stage=stage, millis=ms) for stage, ms in result.timings_ms],
        degraded=result.degraded,
        degraded_reason=result.degraded_reason,
        candidates=result.candidates,
    )
    for item in result.items:
        response.items.append(
            ranker_pb2.RankedItem(
                item_id=item.item_id,
                score=item.score,
                title=catalog.titles[item.row],
                category=catalog.categories[item.row] or "",
                brand=catalog.brands[item.row] or "",
                price=_price(float(catalog.prices[item.row])),
                breakdown=[
                    ranker_pb2.ScoreComponent(
                        name=c.name, raw=c.raw, normalized=c.normalized, weight=c.weight, contribution=c.contribution
                    )
                    for c in item.breakdown
                ],
            )
        )
    return response


class RankerServicer(ranker_pb2_grpc.RankerServicer):
    """The Ranker service; `current` returns the serving Ranker (a release swap replaces it)."""

    def __init__(self, current: Callable[[], Ranker], settings: Settings) -> None:
        self._current = current
        self._settings = settings

    async def Rank(self, request: ranker_pb2.RankRequest, context: grpc.aio.ServicerContext) -> ranker_pb2.RankResponse:
        ranker = self._current()
        try:
            query = to_query(request, self._settings, ranker.release.catalog.row_of, ranker.release.policy)
            result = await ranker.rank(query, timeout=self._timeout(context))
            return to_response(result, ranker)
        except RankerError as e:
            await context.abort(status_code(e), str(e))
        except Exception:
            log.exception("Rank failed (request_id=%s)", request.request_id[:MAX_ID_CHARS])
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable: context.abort raises")

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        limit = self._settings.triton_timeout_s
        return limit if remaining is None else max(0.001, min(limit, remaining))
