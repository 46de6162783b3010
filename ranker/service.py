"""Protobuf <-> domain glue for the Ranker gRPC service: validation in, results out, errors mapped.

Nothing else in the service touches generated protobuf classes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Container
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc

from ranker import tracing
from ranker.config import Settings
from ranker.domain import (
    DEFAULT_STRENGTH,
    CatalogItem,
    DiversityMethod,
    DiversitySpec,
    Personalization,
    RankQuery,
    RankResult,
    Rule,
    RuleAction,
)
from ranker.errors import InvalidArgument, NotConfigured, RankerError, status_code
from ranker.events import Event, EventLimits, EventType, RawEvent, Rejection, check_events
from ranker.live_catalog import CatalogUpdates
from ranker.personal import Personalizer
from ranker.pipeline import Ranker, check_candidate_ids
from ranker.policy import DEFAULT, Policy, make_rule
from ranker.privacy import user_ref
from ranker.profiles import ItemSpace
from ranker.v1 import ranker_pb2, ranker_pb2_grpc

if TYPE_CHECKING:
    from ranker.swap import ReleaseStamp, Swapped

log = logging.getLogger(__name__)

_METHODS = {
    ranker_pb2.DIVERSITY_METHOD_UNSPECIFIED: DiversityMethod.NONE,
    ranker_pb2.DIVERSITY_METHOD_NONE: DiversityMethod.NONE,
    ranker_pb2.DIVERSITY_METHOD_MMR: DiversityMethod.MMR,
    ranker_pb2.DIVERSITY_METHOD_DPP: DiversityMethod.DPP,
    ranker_pb2.DIVERSITY_METHOD_MAX_SUM: DiversityMethod.MAX_SUM,
}
_ACTIONS = {
    ranker_pb2.RULE_ACTION_PIN: RuleAction.PIN,
    ranker_pb2.RULE_ACTION_EXCLUDE: RuleAction.EXCLUDE,
    ranker_pb2.RULE_ACTION_BOOST: RuleAction.BOOST,
    ranker_pb2.RULE_ACTION_BURY: RuleAction.BURY,
}
_PERSONALIZATION = {
    Personalization.NONE: ranker_pb2.PERSONALIZATION_NONE,
    Personalization.APPLIED: ranker_pb2.PERSONALIZATION_APPLIED,
    Personalization.COLD_START: ranker_pb2.PERSONALIZATION_COLD_START,
    Personalization.UNAVAILABLE: ranker_pb2.PERSONALIZATION_UNAVAILABLE,
}
_EVENT_TYPES = {
    ranker_pb2.EVENT_TYPE_VIEW: EventType.VIEW,
    ranker_pb2.EVENT_TYPE_CLICK: EventType.CLICK,
    ranker_pb2.EVENT_TYPE_ADD_TO_CART: EventType.ADD_TO_CART,
    ranker_pb2.EVENT_TYPE_PURCHASE: EventType.PURCHASE,
    ranker_pb2.EVENT_TYPE_SEARCH: EventType.SEARCH,
}
MAX_ID_CHARS = 256
MAX_CATEGORIES = 100
MAX_RULES = 50
MAX_RULE_ITEMS = 1000
MAX_UPSERT_ITEMS = 1000
MAX_DELETE_ITEMS = 10_000
MAX_TITLE_CHARS = 1000
UPSERT_TIMEOUT_S = 60.0  # for embedding an upsert's titles when the caller sets no deadline


def _check_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters, got {len(value)}")


def _check_price(field: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(field, f"must be a finite number >= 0, got {value!r}")


def _diversity(request: ranker_pb2.RankRequest, max_top_k: int, policy: Policy) -> DiversitySpec | None:
    """The request's diversity, or None for the policy's default. An unspecified method with caps, a
    strength or a window keeps the policy's method; an unset strength, window or cap is the policy's
    when the method is the policy's."""
    d = request.diversity
    if d.method not in _METHODS:
        raise InvalidArgument("diversity.method", f"unknown method {d.method}; known: {sorted(_METHODS)}")
    strength = d.strength if d.HasField("strength") else None
    if strength is not None and (not math.isfinite(strength) or not 0.0 <= strength <= 1.0):
        raise InvalidArgument("diversity.strength", f"must be in 0..1, got {strength!r}")
    window = d.window if d.HasField("window") else None
    for name in ("max_per_category", "max_per_brand", "window"):
        value = getattr(d, name)
        if value > max_top_k:
            raise InvalidArgument(f"diversity.{name}", f"must be 0..{max_top_k}, got {value}")
    caps = ("max_per_category", "max_per_brand")
    if d.method == ranker_pb2.DIVERSITY_METHOD_UNSPECIFIED:
        if strength is None and window is None and not any(d.HasField(name) for name in caps):
            return None
        method = policy.diversity.method
    else:
        method = _METHODS[d.method]
    # What the request leaves unset comes from the policy when the method is the policy's.
    base = (
        policy.diversity
        if method is policy.diversity.method
        else DiversitySpec(method=method, strength=DEFAULT_STRENGTH[method])
    )
    return DiversitySpec(
        method=method,
        strength=base.strength if strength is None else strength,
        max_per_category=d.max_per_category if d.HasField("max_per_category") else base.max_per_category,
        max_per_brand=d.max_per_brand if d.HasField("max_per_brand") else base.max_per_brand,
        window=base.window if window is None else window,
    )


def _rules(
    request: ranker_pb2.RankRequest, known: Container[str], policy: Policy, max_position: int
) -> tuple[Rule, ...]:
    if len(request.rules) > MAX_RULES:
        raise InvalidArgument("rules", f"at most {MAX_RULES} rules, got {len(request.rules)}")
    result = []
    for i, rule in enumerate(request.rules):
        where = f"rules[{i}]"
        if rule.action not in _ACTIONS:
            raise InvalidArgument(f"{where}.action", f"must be one of {sorted(_ACTIONS)}, got {rule.action}")
        if len(rule.item_ids) > MAX_RULE_ITEMS:
            raise InvalidArgument(f"{where}.item_ids", f"at most {MAX_RULE_ITEMS} ids, got {len(rule.item_ids)}")
        for j, item_id in enumerate(rule.item_ids):
            if item_id not in known:
                raise InvalidArgument(f"{where}.item_ids[{j}]", f"unknown item id {item_id[:64]!r}")
        if len(rule.values) > MAX_CATEGORIES:
            raise InvalidArgument(f"{where}.values", f"at most {MAX_CATEGORIES} values, got {len(rule.values)}")
        for j, value in enumerate(rule.values):
            _check_length(f"{where}.values[{j}]", value, MAX_ID_CHARS)
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
                max_position=max_position,
            )
        )
    return tuple(result)


def to_query(
    request: ranker_pb2.RankRequest, settings: Settings, known: Container[str], policy: Policy = DEFAULT
) -> RankQuery:
    """Validate a RankRequest; every violation names the field, the value and the limit. `known`: the ids
    a request may name (Catalog.known_ids)."""
    _check_length("request_id", request.request_id, MAX_ID_CHARS)
    if not request.request_id.isprintable():
        raise InvalidArgument("request_id", f"must hold no control characters, got {request.request_id[:64]!r}")
    _check_length("query", request.query, settings.max_query_chars)
    if request.HasField("user_id"):
        _check_length("user_id", request.user_id, MAX_ID_CHARS)
    user_id = request.user_id if request.HasField("user_id") and request.user_id.strip() else None
    candidate_ids = tuple(request.candidate_ids)
    check_candidate_ids(candidate_ids, known, settings.max_candidate_ids)
    if not request.query.strip() and not candidate_ids and user_id is None:
        # With a user_id and no query, Rank recommends from the user's profile.
        raise InvalidArgument("query", "must not be empty when candidate_ids is empty and user_id is unset")
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
        user_id=user_id,
        candidate_ids=candidate_ids,
        categories=frozenset(filters.categories),
        min_price=min_price,
        max_price=max_price,
        in_stock_only=filters.in_stock_only,
        weights=dict(request.blend.weights),
        diversity=_diversity(request, settings.max_top_k, policy),
        rules=_rules(request, known, policy, settings.max_top_k),
        exclude_purchased=request.exclude_purchased,
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
        personalization=_PERSONALIZATION[result.personalization],
    )
    items = response.items
    for item in result.items:
        shown = items.add(
            item_id=item.item_id,
            score=item.score,
            title=catalog.titles[item.row],
            category=catalog.categories[item.row] or "",
            brand=catalog.brands[item.row] or "",
            price=_price(float(catalog.prices[item.row])),
        )
        breakdown = shown.breakdown  # add() in place: half the time of building each message and copying it in
        for c in item.breakdown:
            breakdown.add(name=c.name, raw=c.raw, normalized=c.normalized, weight=c.weight, contribution=c.contribution)
    return response


def _check_item_id(field: str, value: str) -> None:
    if not value.strip():
        raise InvalidArgument(field, "must not be empty")
    if value != value.strip():
        raise InvalidArgument(field, f"must not start or end with whitespace, got {value[:64]!r}")
    _check_length(field, value, MAX_ID_CHARS)


# The magnitude limit of a catalog number: far beyond any price, count or margin, and small enough that
# blending (spans, variances, weighted sums) cannot overflow.
MAX_ATTRIBUTE_MAGNITUDE = 1e12


def _optional_number(item: ranker_pb2.CatalogItem, name: str, where: str, minimum: float | None) -> float | None:
    if not item.HasField(name):
        return None
    value = float(getattr(item, name))
    low = -MAX_ATTRIBUTE_MAGNITUDE if minimum is None else minimum
    if not (math.isfinite(value) and low <= value <= MAX_ATTRIBUTE_MAGNITUDE):
        raise InvalidArgument(
            f"{where}.{name}", f"must be a number in {low:g}..{MAX_ATTRIBUTE_MAGNITUDE:g}, got {value!r}"
        )
    return value


def _optional_text(item: ranker_pb2.CatalogItem, name: str, where: str) -> str | None:
    value = str(getattr(item, name))
    _check_length(f"{where}.{name}", value, MAX_ID_CHARS)
    return value.strip() or None  # as the export reads an empty category or brand


def to_catalog_item(item: ranker_pb2.CatalogItem, where: str) -> CatalogItem:
    _check_item_id(f"{where}.item_id", item.item_id)
    _check_length(f"{where}.title", item.title, MAX_TITLE_CHARS)
    title = item.title.strip()
    if not title:
        raise InvalidArgument(f"{where}.title", "must not be empty")
    created_at = None
    if item.HasField("created_at"):
        try:
            created_at = item.created_at.ToDatetime(tzinfo=UTC).date()
        except (ValueError, OverflowError) as e:
            raise InvalidArgument(f"{where}.created_at", f"must be a valid timestamp, got {item.created_at}") from e
    return CatalogItem(
        item_id=item.item_id,
        title=title,
        category=_optional_text(item, "category", where),
        brand=_optional_text(item, "brand", where),
        price=_optional_number(item, "price", where, minimum=0.0),
        popularity=_optional_number(item, "popularity", where, minimum=0.0),
        rating=_optional_number(item, "rating", where, minimum=0.0),
        margin=_optional_number(item, "margin", where, minimum=None),
        boost=_optional_number(item, "boost", where, minimum=None),
        in_stock=item.in_stock if item.HasField("in_stock") else None,
        created_at=created_at,
    )


def to_catalog_items(request: ranker_pb2.UpsertItemsRequest) -> tuple[CatalogItem, ...]:
    """Validate an UpsertItemsRequest; every violation names the field (items[3].price), the value and the limit."""
    if not 1 <= len(request.items) <= MAX_UPSERT_ITEMS:
        raise InvalidArgument("items", f"must hold 1..{MAX_UPSERT_ITEMS} items, got {len(request.items)}")
    first: dict[str, int] = {}
    items = []
    for i, item in enumerate(request.items):
        items.append(to_catalog_item(item, f"items[{i}]"))
        if item.item_id in first:
            raise InvalidArgument(f"items[{i}].item_id", f"repeats items[{first[item.item_id]}]: {item.item_id[:64]!r}")
        first[item.item_id] = i
    return tuple(items)


def to_item_ids(request: ranker_pb2.DeleteItemsRequest) -> tuple[str, ...]:
    """Validate a DeleteItemsRequest; a repeated id is deleted once."""
    if not 1 <= len(request.item_ids) <= MAX_DELETE_ITEMS:
        raise InvalidArgument("item_ids", f"must hold 1..{MAX_DELETE_ITEMS} ids, got {len(request.item_ids)}")
    for i, item_id in enumerate(request.item_ids):
        _check_item_id(f"item_ids[{i}]", item_id)
    return tuple(dict.fromkeys(request.item_ids))


def _personalizer(ranker: Ranker) -> Personalizer:
    if ranker.personalizer is None:
        raise NotConfigured("this server keeps no user profiles (no profile store)")
    return ranker.personalizer


def event_limits(settings: Settings) -> EventLimits:
    return EventLimits(
        max_events=settings.max_events_per_request,
        max_id_chars=MAX_ID_CHARS,
        max_query_chars=settings.max_query_chars,
        max_future_s=settings.event_max_future_s,
    )


def _raw_event(event: ranker_pb2.Event) -> RawEvent:
    timestamp = None
    if event.HasField("timestamp"):
        timestamp = event.timestamp.seconds + event.timestamp.nanos / 1e9
        if not 0 <= event.timestamp.nanos < 1_000_000_000:
            timestamp = math.nan  # rejected as an invalid time
    return RawEvent(
        event_id=event.event_id,
        user_id=event.user_id,
        item_id=event.item_id,
        type=_EVENT_TYPES.get(event.type),
        type_value=int(event.type),
        timestamp=timestamp,
        query=event.query,
    )


def to_events(
    request: ranker_pb2.RecordEventsRequest, ranker: Ranker, settings: Settings, now: float
) -> tuple[list[Event], list[Rejection]]:
    """Valid events and rejections (each with its index and reason); too many events raises InvalidArgument."""
    limits = event_limits(settings)
    if len(request.events) > limits.max_events:  # before converting a huge batch
        raise InvalidArgument("events", f"at most {limits.max_events} events per request, got {len(request.events)}")
    catalog = ranker.release.catalog
    return check_events(
        [_raw_event(e) for e in request.events],
        is_live_item=lambda item_id: catalog.live_row(item_id) is not None,
        limits=limits,
        now=now,
    )


@contextlib.asynccontextmanager
async def _statuses(context: grpc.aio.ServicerContext, failure: str, *args: object) -> AsyncIterator[None]:
    """Abort the RPC with the status of a ranker.errors exception, or INTERNAL with a generic message for
    anything unexpected (the traceback goes to the log only, with `failure % args`)."""
    try:
        yield
    except RankerError as e:
        await context.abort(status_code(e), str(e))
    except Exception:
        log.exception(failure, *args)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class RankerServicer(ranker_pb2_grpc.RankerServicer):
    """The Ranker service; `current` returns the serving Ranker (a release swap or a catalog update replaces
    it); `catalog` takes online catalog updates (without it, UpsertItems and DeleteItems are UNIMPLEMENTED)."""

    def __init__(
        self, current: Callable[[], Ranker], settings: Settings, *, catalog: CatalogUpdates | None = None
    ) -> None:
        self._current = current
        self._settings = settings
        self._catalog = catalog

    async def Rank(self, request: ranker_pb2.RankRequest, context: grpc.aio.ServicerContext) -> ranker_pb2.RankResponse:
        ranker = self._current()
        async with _statuses(context, "Rank failed (request_id=%s)", request.request_id[:MAX_ID_CHARS]):
            query = to_query(request, self._settings, ranker.release.catalog.known_ids, ranker.release.policy)
            caller = tracing.incoming(context.invocation_metadata()) if tracing.enabled() else None
            with tracing.span("Rank", context=caller, attributes={"ranker.request_id": query.request_id}):
                result = await ranker.rank(query, timeout=self._timeout(context))
                return to_response(result, ranker)
        raise AssertionError("unreachable: _statuses aborts the RPC on any error")

    async def UpsertItems(
        self, request: ranker_pb2.UpsertItemsRequest, context: grpc.aio.ServicerContext
    ) -> ranker_pb2.UpsertItemsResponse:
        catalog = await self._live_catalog(context)
        async with _statuses(context, "UpsertItems failed (%d items)", len(request.items)):
            items = to_catalog_items(request)
            remaining = context.time_remaining()
            timeout = UPSERT_TIMEOUT_S if remaining is None else max(0.001, remaining)
            applied = await catalog.upsert(items, timeout=timeout)
            return ranker_pb2.UpsertItemsResponse(inserted=applied.inserted, updated=applied.updated)
        raise AssertionError("unreachable: _statuses aborts the RPC on any error")

    async def DeleteItems(
        self, request: ranker_pb2.DeleteItemsRequest, context: grpc.aio.ServicerContext
    ) -> ranker_pb2.DeleteItemsResponse:
        catalog = await self._live_catalog(context)
        async with _statuses(context, "DeleteItems failed (%d ids)", len(request.item_ids)):
            applied = await catalog.delete(to_item_ids(request))
            return ranker_pb2.DeleteItemsResponse(deleted=applied.deleted, not_found=list(applied.not_found))
        raise AssertionError("unreachable: _statuses aborts the RPC on any error")

    async def RecordEvents(
        self, request: ranker_pb2.RecordEventsRequest, context: grpc.aio.ServicerContext
    ) -> ranker_pb2.RecordEventsResponse:
        ranker = self._current()
        async with _statuses(context, "RecordEvents failed (%d events)", len(request.events)):
            personalizer = _personalizer(ranker)
            events, rejected = to_events(request, ranker, self._settings, time.time())
            counts = await personalizer.record(ItemSpace.of(ranker.release), events)
            log.info(
                "RecordEvents: %d applied, %d duplicates, %d rejected (%d users)",
                counts.applied,
                counts.duplicates,
                len(rejected),
                len({e.user_id for e in events}),
            )
            return ranker_pb2.RecordEventsResponse(
                applied=counts.applied,
                duplicates=counts.duplicates,
                rejected=[
                    ranker_pb2.EventRejection(index=r.index, event_id=r.event_id, reason=r.reason) for r in rejected
                ],
            )
        raise AssertionError("unreachable: _statuses aborts the RPC on any error")

    async def ForgetUser(
        self, request: ranker_pb2.ForgetUserRequest, context: grpc.aio.ServicerContext
    ) -> ranker_pb2.ForgetUserResponse:
        async with _statuses(context, "ForgetUser failed (%s)", user_ref(request.user_id)):
            if not request.user_id.strip():
                raise InvalidArgument("user_id", "must not be empty")
            _check_length("user_id", request.user_id, MAX_ID_CHARS)
            existed = await _personalizer(self._current()).forget(request.user_id)
            log.info("ForgetUser %s: %s", user_ref(request.user_id), "deleted" if existed else "nothing stored")
            return ranker_pb2.ForgetUserResponse(existed=existed)
        raise AssertionError("unreachable: _statuses aborts the RPC on any error")

    async def _live_catalog(self, context: grpc.aio.ServicerContext) -> CatalogUpdates:
        if self._catalog is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server does not take catalog updates")
            raise AssertionError("unreachable: context.abort raises")
        return self._catalog

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        limit = self._settings.triton_timeout_s
        return limit if remaining is None else max(0.001, min(limit, remaining))


class ReleaseLoader(Protocol):
    async def load(self, path: Path) -> Swapped: ...


def _release_info(stamp: ReleaseStamp) -> ranker_pb2.ReleaseInfo:
    return ranker_pb2.ReleaseInfo(release_id=stamp.release_id, model_versions=dict(stamp.model_versions))


class RankerAdminServicer(ranker_pb2_grpc.RankerAdminServicer):
    """RankerAdmin: LoadRelease swaps the serving release (ranker.swap.ReleaseSwitch)."""

    def __init__(self, releases: ReleaseLoader) -> None:
        self._releases = releases

    async def LoadRelease(
        self, request: ranker_pb2.LoadReleaseRequest, context: grpc.aio.ServicerContext
    ) -> ranker_pb2.LoadReleaseResponse:
        async with _statuses(context, "LoadRelease failed (%s)", request.path[:4096]):
            if not request.path.strip():
                raise InvalidArgument("path", "must not be empty")
            _check_length("path", request.path, 4096)
            swapped = await self._releases.load(Path(request.path))
            return ranker_pb2.LoadReleaseResponse(
                previous=_release_info(swapped.previous), current=_release_info(swapped.current), millis=swapped.millis
            )
        raise AssertionError("unreachable: _statuses aborts the RPC on any error")
