"""The service's value types: what a Rank request asks for and what it returns."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date


class DiversityMethod(enum.Enum):
    NONE = "none"
    MMR = "mmr"
    DPP = "dpp"
    MAX_SUM = "max_sum"


# The strength of a method named without one. MAX_SUM sums a similarity over the chosen items where
# MMR takes the max, so its useful strengths are about ten times smaller (docs/diversity.md).
DEFAULT_STRENGTH: Mapping[DiversityMethod, float] = {
    DiversityMethod.NONE: 0.0,
    DiversityMethod.MMR: 0.3,
    DiversityMethod.DPP: 0.3,
    DiversityMethod.MAX_SUM: 0.04,
}


@dataclass(frozen=True, kw_only=True)
class DiversitySpec:
    method: DiversityMethod = DiversityMethod.NONE
    strength: float = 0.0  # 0 = pure relevance, 1 = pure diversity
    max_per_category: int = 0  # 0 = no cap
    max_per_brand: int = 0
    # > 0: diversify each run of this many positions on its own and show it in relevance order
    # (ranker.diversity.select); 0 = one run over the whole list, shown in pick order.
    window: int = 0


class RuleAction(enum.Enum):
    PIN = "pin"
    EXCLUDE = "exclude"
    BOOST = "boost"
    BURY = "bury"


RULE_FIELDS = ("category", "brand")


@dataclass(frozen=True, kw_only=True)
class Rule:
    """A business rule; matches items by id, or by an attribute (field in RULE_FIELDS) and values."""

    action: RuleAction
    item_ids: frozenset[str] = frozenset()
    field: str = ""
    values: frozenset[str] = frozenset()
    amount: float = 0.0  # boost / bury
    position: int = 0  # pin, 1-based


class Personalization(enum.Enum):
    """Whether a user's profile took part in a ranking."""

    NONE = "none"  # no user_id
    APPLIED = "applied"  # the profile contributed the "personal" signal
    COLD_START = "cold_start"  # user_id without a profile (yet): the non-personalised result
    UNAVAILABLE = "unavailable"  # the profile store failed or was too slow: the non-personalised result


@dataclass(frozen=True, kw_only=True)
class RankQuery:
    request_id: str
    query: str
    top_k: int
    user_id: str | None = None
    candidate_ids: tuple[str, ...] = ()
    categories: frozenset[str] = frozenset()
    min_price: float | None = None
    max_price: float | None = None
    in_stock_only: bool = False
    weights: Mapping[str, float] = field(default_factory=dict)
    diversity: DiversitySpec | None = None  # None: the policy's default
    rules: tuple[Rule, ...] = ()
    exclude_purchased: bool = False  # with user_id: drop the items the profile lists as purchased


@dataclass(frozen=True, kw_only=True)
class ScoreComponent:
    name: str
    raw: float
    normalized: float
    weight: float
    contribution: float


@dataclass(frozen=True, kw_only=True)
class ScoredItem:
    item_id: str
    row: int
    score: float
    breakdown: tuple[ScoreComponent, ...]


@dataclass(frozen=True, kw_only=True)
class RankResult:
    request_id: str
    items: tuple[ScoredItem, ...]
    release_id: str
    model_versions: Mapping[str, str]
    timings_ms: tuple[tuple[str, float], ...]
    candidates: int
    degraded: bool = False
    degraded_reason: str = ""
    personalization: Personalization = Personalization.NONE


@dataclass(frozen=True, kw_only=True)
class CatalogItem:
    """A catalog item sent online (UpsertItems); None means unknown, as a null in the release's items."""

    item_id: str
    title: str
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    popularity: float | None = None
    rating: float | None = None
    margin: float | None = None
    boost: float | None = None
    in_stock: bool | None = None
    created_at: date | None = None
