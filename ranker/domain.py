"""The service's value types: what a Rank request asks for and what it returns."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class DiversityMethod(enum.Enum):
    NONE = "none"
    MMR = "mmr"
    DPP = "dpp"


@dataclass(frozen=True, kw_only=True)
class DiversitySpec:
    method: DiversityMethod = DiversityMethod.NONE
    strength: float = 0.0  # 0 = pure relevance, 1 = pure diversity
    max_per_category: int = 0  # 0 = no cap
    max_per_brand: int = 0


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
