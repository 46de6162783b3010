"""The "personal" signal: how well each candidate fits a shopper's profile; and candidates from a profile alone.

personal(item) = sum over components c of weight[c] * c(item), with the components

  centroid    cosine between the item and the profile's centroid (all of the user's history, decayed)
  recent      mean cosine between the item and the latest items (newest weighted most, `recency` per step)
  neighbours  sum over the latest items j (same weights, summing to 1) of P(item | j) from the release's
              item-to-item neighbours (ranker.neighbours; learned offline from other shoppers' sequences)
  category    share of the profile's weight in the item's category
  brand       share of the profile's weight in the item's brand
  popularity  log interactions of the item in the neighbours' training data, scaled to 0..1

The weights below were chosen on a split of the training histories (docs/personalization.md); a
component without its data (no neighbours artifact, no categories) is 0 for every item.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ranker.domain import Personalization
from ranker.errors import BackendError
from ranker.events import TYPE_WEIGHTS, Event, EventType
from ranker.neighbours import ItemNeighbours
from ranker.privacy import user_ref
from ranker.profiles import (
    ItemSpace,
    Profile,
    ProfileConfig,
    ProfileStore,
    RecordCounts,
    apply_events,
    centroid_of_recent,
)
from ranker.retrieval import Candidates, DenseRetriever, top_rows, union_rows

log = logging.getLogger(__name__)

COMPONENTS = ("centroid", "recent", "neighbours", "category", "brand", "popularity")
_MAX_TYPE_WEIGHT = TYPE_WEIGHTS[EventType.PURCHASE]


@dataclass(frozen=True, kw_only=True)
class PersonalWeights:
    # Chosen by coordinate ascent on the holdout split of the training histories (docs/personalization.md:
    # `python -m offline.evaluate personalization --split holdout --tune 2`), never on the valid targets.
    centroid: float = 1.0
    recent: float = 0.2
    neighbours: float = 5.25
    category: float = 0.0
    brand: float = 0.15
    popularity: float = 0.45
    recency: float = 0.3  # weight of the k-th latest item is recency**k (times its event type's weight)
    recent_items: int = 10  # latest items feeding "recent" and "neighbours"

    def of(self, component: str) -> float:
        return float(getattr(self, component))


def _recent_rows(profile: Profile, items: ItemSpace, weights: PersonalWeights) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the latest items still in the catalog, and their weights (summing to 1)."""
    rows: list[int] = []
    strength: list[float] = []
    for r in profile.recent:
        if len(rows) >= weights.recent_items:
            break
        row = items.live_row(r.item_id)
        if row is not None:
            strength.append(weights.recency ** len(rows) * r.weight / _MAX_TYPE_WEIGHT)
            rows.append(row)
    g = np.asarray(strength, dtype=np.float64)
    return np.asarray(rows, dtype=np.int64), (g / g.sum() if g.sum() > 0 else g)


def _unit(vector: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else None


def _share(
    weights: Mapping[str, float], rows_of: Mapping[str, np.ndarray], rows: np.ndarray, total: float, size: int
) -> np.ndarray:
    """Each candidate's value's share of the profile weight (0 for values the profile has not seen)."""
    if not weights or total <= 0:
        return np.zeros(len(rows))
    per_row = np.zeros(size, dtype=np.float64)
    for value, weight in weights.items():
        matching = rows_of.get(value)
        if matching is not None:
            per_row[matching[matching < size]] = weight / total
    return per_row[rows]


def components(
    profile: Profile,
    rows: np.ndarray,
    items: ItemSpace,
    neighbours: ItemNeighbours | None,
    weights: PersonalWeights,
    *,
    only: Sequence[str] = COMPONENTS,
) -> dict[str, np.ndarray]:
    """Each component's value for each candidate row (those not in `only` are skipped)."""
    rows = np.asarray(rows, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    candidates = np.asarray(items.embeddings[rows], dtype=np.float32)
    size = len(items.embeddings)
    if "centroid" in only:
        direction = _unit(profile.centroid) if len(profile.centroid) == candidates.shape[1] else None
        out["centroid"] = candidates @ direction if direction is not None else np.zeros(len(rows))
    recent, g = _recent_rows(profile, items, weights)
    if "recent" in only:
        if len(recent):
            similarities = np.asarray(items.embeddings[recent], dtype=np.float32) @ candidates.T
            out["recent"] = g @ similarities
        else:
            out["recent"] = np.zeros(len(rows))
    if "neighbours" in only:
        if neighbours is not None and len(recent):
            out["neighbours"] = neighbours.spread(recent, g, len(items.embeddings))[rows]
        else:
            out["neighbours"] = np.zeros(len(rows))
    if "category" in only:
        out["category"] = _share(profile.categories, items.rows_by_value["category"], rows, profile.weight, size)
    if "brand" in only:
        out["brand"] = _share(profile.brands, items.rows_by_value["brand"], rows, profile.weight, size)
    if "popularity" in only:
        out["popularity"] = neighbours.popularity(rows) if neighbours is not None else np.zeros(len(rows))
    return {name: np.asarray(values, dtype=np.float64) for name, values in out.items()}


def personal_scores(
    profile: Profile, rows: np.ndarray, items: ItemSpace, neighbours: ItemNeighbours | None, weights: PersonalWeights
) -> np.ndarray:
    """The "personal" signal for each candidate row: the weighted sum of the components."""
    used = [c for c in COMPONENTS if weights.of(c) != 0.0]
    parts = components(profile, rows, items, neighbours, weights, only=used)
    total = np.zeros(len(rows), dtype=np.float64)
    for name in used:
        total += weights.of(name) * parts[name]
    return total


def profile_candidates(
    profile: Profile,
    items: ItemSpace,
    dense: DenseRetriever,
    neighbours: ItemNeighbours | None,
    weights: PersonalWeights,
    *,
    k: int,
    allowed: np.ndarray | None,
    include: np.ndarray,
    near: np.ndarray | None = None,
) -> Candidates:
    """Recommendations (no query): the k items nearest the centroid (ANN) and the k strongest neighbours of
    the latest items. `dense` on the candidates is their cosine to the centroid; there is no lexical signal.
    `near`: the ANN rows when the caller searched already (a remote engine, searched off the event loop)."""
    direction = profile_direction(profile, items)
    if near is None:
        near = dense.search(direction, k, allowed) if direction is not None else np.zeros(0, dtype=np.int64)
    behavioural = np.zeros(0, dtype=np.int64)
    recent, g = _recent_rows(profile, items, weights)
    if neighbours is not None and len(recent):
        behavioural = top_rows(neighbours.spread(recent, g, len(items.embeddings)), k, allowed)
    rows = union_rows(near, behavioural, include)
    cosine = dense.similarities(direction, rows) if direction is not None else np.zeros(len(rows), dtype=np.float32)
    return Candidates(rows, cosine, np.zeros(len(rows), dtype=np.float32), near, behavioural)


def profile_direction(profile: Profile, items: ItemSpace) -> np.ndarray | None:
    """The unit centroid of the profile's items, what recommendations search near; None when it has none in
    this item space's dimension."""
    return _unit(profile.centroid) if len(profile.centroid) == items.embeddings.shape[1] else None


def popular_candidates(
    popularity: np.ndarray,
    k: int,
    allowed: np.ndarray | None,
    include: np.ndarray,
    *,
    tiebreak: np.ndarray | None = None,
) -> Candidates:
    """Recommendations without a profile (cold start): the most popular items (NaN: unknown, last), ties by
    `tiebreak` (the same way) and then by row."""
    values = np.nan_to_num(np.asarray(popularity, dtype=np.float64), nan=-np.inf)
    rows = np.arange(len(values)) if allowed is None else np.flatnonzero(allowed)
    keys = [rows]
    if tiebreak is not None:
        keys.append(-np.nan_to_num(np.asarray(tiebreak, dtype=np.float64), nan=-np.inf)[rows])
    order = np.lexsort((*keys, -values[rows]))[:k]
    ranked = union_rows(rows[order], include)
    zeros = np.zeros(len(ranked), dtype=np.float32)
    return Candidates(ranked, zeros, zeros, ranked, np.zeros(0, dtype=np.int64))


@dataclass(frozen=True, kw_only=True)
class Personalizer:
    """Profiles for the serving pipeline: the store, the update rule's settings and the scorer's weights.

    Independent of the release: the same instance serves every release and catalog version, each call
    taking the item space (rows, embeddings) of the release it is given."""

    store: ProfileStore
    config: ProfileConfig = field(default_factory=ProfileConfig)
    weights: PersonalWeights = field(default_factory=PersonalWeights)
    timeout_s: float = 0.1  # a profile read slower than this answers Rank without personalisation

    async def lookup(self, user_id: str, *, timeout: float | None = None) -> tuple[Profile | None, Personalization]:
        """The user's profile and what it means for the ranking; never raises. Waits at most `timeout_s`
        (or `timeout`, the request's remaining budget, when that is shorter)."""
        limit = self.timeout_s if timeout is None else min(self.timeout_s, timeout)
        try:
            profile = await asyncio.wait_for(self.store.get(user_id), limit)
        except TimeoutError:
            log.warning("profile store: no answer within %.0f ms for %s", limit * 1000, user_ref(user_id))
            return None, Personalization.UNAVAILABLE
        except BackendError as e:
            log.warning("profile store unavailable for %s: %s", user_ref(user_id), e)
            return None, Personalization.UNAVAILABLE
        except Exception as e:  # a corrupt entry, a bug: Rank answers without the profile rather than fail
            log.exception("profile of %s could not be read (%s)", user_ref(user_id), type(e).__name__)
            return None, Personalization.UNAVAILABLE
        if profile is None or profile.is_cold:
            return profile, Personalization.COLD_START
        return profile, Personalization.APPLIED

    def align(self, profile: Profile, items: ItemSpace) -> Profile:
        """The profile with its centroid in `items`' embedding space (rebuilt from the recent items when the
        profile was written under a release with another text encoder)."""
        if profile.space == items.space_id and len(profile.centroid) == items.embeddings.shape[1]:
            return profile
        return replace(profile, space=items.space_id, centroid=centroid_of_recent(profile, items, self.config))

    async def record(self, items: ItemSpace, events: Sequence[Event]) -> RecordCounts:
        """Apply validated events (idempotent by event id); returns once the stores say they are durable."""
        by_user: dict[str, list[Event]] = {}
        for event in events:
            by_user.setdefault(event.user_id, []).append(event)
        config = self.config

        def update(profile: Profile | None, fresh: Sequence[Event]) -> Profile:
            return apply_events(profile, fresh, items, config)

        return await self.store.record(by_user, update)

    async def forget(self, user_id: str) -> bool:
        return await self.store.forget(user_id)
