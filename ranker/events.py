"""Shopper events (RecordEvents): their types and weights, and validation one event at a time.

A bad event is rejected alone, with its position and a reason naming the field, while the valid
events of the same batch are applied. Only the size of the whole batch fails the call.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

from ranker.errors import InvalidArgument


class EventType(enum.Enum):
    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    SEARCH = "search"  # carries a query; it does not move the item affinities


# How much one event of a type says about the shopper's taste: purchase > add to cart > click > view.
TYPE_WEIGHTS: dict[EventType, float] = {
    EventType.VIEW: 1.0,
    EventType.CLICK: 2.0,
    EventType.ADD_TO_CART: 4.0,
    EventType.PURCHASE: 8.0,
    EventType.SEARCH: 0.0,
}


@dataclass(frozen=True, kw_only=True)
class Event:
    event_id: str
    user_id: str
    item_id: str  # "" for a SEARCH without an item
    type: EventType
    timestamp: float  # seconds since the epoch (UTC)
    query: str = ""


@dataclass(frozen=True, kw_only=True)
class Rejection:
    index: int  # position in the request
    event_id: str  # as sent, cut to MAX_ID_CHARS
    reason: str  # "<field>: <what is wrong>"


@dataclass(frozen=True, kw_only=True)
class EventLimits:
    max_events: int = 1000  # per request; more fails the whole call with INVALID_ARGUMENT
    max_id_chars: int = 256  # event_id, user_id, item_id
    max_query_chars: int = 1000
    max_future_s: float = 300.0  # clock skew tolerated for a timestamp ahead of the server's clock


@dataclass(frozen=True, kw_only=True)
class RawEvent:
    """An event as received, before validation (the service fills it from the protobuf)."""

    event_id: str
    user_id: str
    item_id: str
    type: EventType | None  # None: unspecified or unknown
    type_value: int  # the wire value, for the reason
    timestamp: float | None  # None: unset, the time of receipt is used
    query: str = ""


def check_batch_size(count: int, limits: EventLimits) -> None:
    if count > limits.max_events:
        raise InvalidArgument("events", f"at most {limits.max_events} events per request, got {count}")


def _id_problem(field: str, value: str, limit: int) -> str | None:
    if not value.strip():
        return f"{field}: must not be empty"
    if len(value) > limit:
        return f"{field}: must be at most {limit} characters, got {len(value)}"
    return None


def check_event(
    index: int, raw: RawEvent, *, is_live_item: Callable[[str], bool], limits: EventLimits, now: float
) -> Event | Rejection:
    """The validated event, or why it is refused. `is_live_item` says whether an item id is in the catalog."""

    def reject(reason: str) -> Rejection:
        return Rejection(index=index, event_id=raw.event_id[: limits.max_id_chars], reason=reason)

    for field, value in (("event_id", raw.event_id), ("user_id", raw.user_id)):
        problem = _id_problem(field, value, limits.max_id_chars)
        if problem:
            return reject(problem)
    if raw.type is None:
        known = ", ".join(t.name for t in EventType)
        return reject(f"type: must be one of {known}, got {raw.type_value}")
    if raw.item_id or raw.type is not EventType.SEARCH:
        problem = _id_problem("item_id", raw.item_id, limits.max_id_chars)
        if problem:
            return reject(problem if raw.item_id else f"item_id: required for {raw.type.name} events")
        if not is_live_item(raw.item_id):
            return reject(f"item_id: unknown item {raw.item_id[:64]!r}")
    if len(raw.query) > limits.max_query_chars:
        return reject(f"query: must be at most {limits.max_query_chars} characters, got {len(raw.query)}")
    if raw.type is EventType.SEARCH and not raw.query.strip():
        return reject("query: required for SEARCH events")
    timestamp = now if raw.timestamp is None else raw.timestamp
    if not math.isfinite(timestamp) or timestamp < 0:
        return reject(f"timestamp: must be a time after 1970-01-01, got {timestamp!r}")
    if timestamp > now + limits.max_future_s:
        ahead = timestamp - now
        return reject(f"timestamp: {ahead:.0f} s in the future (at most {limits.max_future_s:g} s is accepted)")
    return Event(
        event_id=raw.event_id,
        user_id=raw.user_id,
        item_id=raw.item_id,
        type=raw.type,
        timestamp=timestamp,
        query=raw.query,
    )


def check_events(
    raws: list[RawEvent], *, is_live_item: Callable[[str], bool], limits: EventLimits, now: float
) -> tuple[list[Event], list[Rejection]]:
    """Valid events in request order, and the rejected ones; a batch over the limit raises InvalidArgument."""
    check_batch_size(len(raws), limits)
    valid: list[Event] = []
    rejected: list[Rejection] = []
    for i, raw in enumerate(raws):
        checked = check_event(i, raw, is_live_item=is_live_item, limits=limits, now=now)
        if isinstance(checked, Event):
            valid.append(checked)
        else:
            rejected.append(checked)
    return valid, rejected
