"""Weighted blending: each signal normalised over the candidates, weighted, summed, and explained.

final[i] = sum over signals s of weight[s] * normalise_s(raw_s)[i], and every item keeps each
signal's raw value, normalised value, weight and contribution, so the score is explainable from the
response alone.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np

from ranker.errors import InvalidArgument


class Normalization(enum.Enum):
    IDENTITY = "identity"
    MINMAX = "minmax"  # (x - min) / (max - min) over the candidates; all equal -> 0
    ZSCORE = "zscore"  # (x - mean) / std over the candidates; std 0 -> 0
    RANK = "rank"  # 1 / (1 + rank), rank 0 = highest value


@dataclass(frozen=True, kw_only=True)
class SignalPolicy:
    weight: float
    normalization: Normalization
    higher_is_better: bool = True  # price: False, so the cheapest item gets the highest value
    missing: float | None = None  # value for items without it (NaN); None: the lowest value present


# Signals the pipeline computes per request, and signals read from catalog columns.
COMPUTED_SIGNALS = ("ranker", "dense", "lexical", "retrieval", "personal")
CATALOG_SIGNALS = ("popularity", "rating", "price", "margin", "boost", "freshness")


# The service's default policy. "ranker" is the learned model's score; "dense" and "lexical" are the
# retrieval scores and "retrieval" their reciprocal-rank fusion, off by default and available to
# per-request overrides. When the ranker cannot run, its weight moves to "retrieval" (see
# without_ranker), so a degraded response is still ordered. "personal" is the fit of each item to the
# shopper's profile (ranker.personal); without a user or a profile it is dropped (without_personal), and
# with no query (recommendations) the ranker's weight moves to it.
DEFAULT_POLICY: Mapping[str, SignalPolicy] = MappingProxyType(
    {
        "ranker": SignalPolicy(weight=1.0, normalization=Normalization.IDENTITY),
        "dense": SignalPolicy(weight=0.0, normalization=Normalization.MINMAX),
        "lexical": SignalPolicy(weight=0.0, normalization=Normalization.MINMAX),
        "retrieval": SignalPolicy(weight=0.0, normalization=Normalization.MINMAX),
        "personal": SignalPolicy(weight=0.3, normalization=Normalization.MINMAX),
        "popularity": SignalPolicy(weight=0.0, normalization=Normalization.RANK),
        "rating": SignalPolicy(weight=0.0, normalization=Normalization.MINMAX),
        "price": SignalPolicy(weight=0.0, normalization=Normalization.MINMAX, higher_is_better=False),
        "margin": SignalPolicy(weight=0.0, normalization=Normalization.MINMAX),
        "boost": SignalPolicy(weight=0.0, normalization=Normalization.IDENTITY, missing=0.0),
        "freshness": SignalPolicy(weight=0.0, normalization=Normalization.MINMAX),
    }
)


def prepare(values: np.ndarray, spec: SignalPolicy) -> np.ndarray:
    """Raw values oriented so higher is better, with missing values (NaN) filled."""
    x = np.asarray(values, dtype=np.float64)
    if not spec.higher_is_better:
        x = -x
    missing = ~np.isfinite(x)  # an infinite value (a release column can hold one) is no value either
    if missing.any():
        if spec.missing is not None:
            fill = spec.missing if spec.higher_is_better else -spec.missing
        else:
            fill = float(np.nanmin(x)) if not missing.all() else 0.0
        x = np.where(missing, fill, x)
    return x


_SCALE_LIMIT = 1e150  # above this, a span or a squared deviation can overflow float64


def normalize(values: np.ndarray, how: Normalization) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0 or how is Normalization.IDENTITY:
        return x
    if how is not Normalization.RANK and np.abs(x).max() > _SCALE_LIMIT:
        x = x / np.abs(x).max()  # both are scale-free; this keeps the span and the variance finite
    if how is Normalization.MINMAX:
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 0 else np.zeros_like(x)
    if how is Normalization.ZSCORE:
        std = x.std()
        return (x - x.mean()) / std if std > 0 else np.zeros_like(x)
    # Competition ranking: equal values share the best rank, so ties do not depend on the candidates' order.
    ranks = np.searchsorted(np.sort(-x), -x, side="left")
    return 1.0 / (1.0 + ranks)


def apply_overrides(
    policy: Mapping[str, SignalPolicy], overrides: Mapping[str, float], *, max_weight: float
) -> dict[str, SignalPolicy]:
    """The policy with per-request weights; raises InvalidArgument naming the offending weight."""
    result = dict(policy)
    for name, weight in sorted(overrides.items()):
        field = f"blend.weights[{name[:64]!r}]"
        if name not in policy:
            raise InvalidArgument(field, f"unknown signal; known signals are {sorted(policy)}")
        if not math.isfinite(weight) or not 0.0 <= weight <= max_weight:
            raise InvalidArgument(field, f"weight must be a finite number in 0..{max_weight:g}, got {weight!r}")
        result[name] = replace(policy[name], weight=weight)
    return result


def without_ranker(policy: Mapping[str, SignalPolicy], to: str = "retrieval") -> dict[str, SignalPolicy]:
    """The policy for a response without ranker scores: the ranker's weight is added to "retrieval" (or `to`)."""
    result = dict(policy)
    moved = result.pop("ranker").weight
    receiver = result[to]
    result[to] = replace(receiver, weight=receiver.weight + moved)
    return result


def without_personal(policy: Mapping[str, SignalPolicy]) -> dict[str, SignalPolicy]:
    """The policy for a response without a profile: the "personal" signal is dropped."""
    result = dict(policy)
    result.pop("personal", None)
    return result


@dataclass(frozen=True)
class Blend:
    """Blended scores and their explanation, for candidates in input order."""

    final: np.ndarray  # [n]
    names: tuple[str, ...]
    raw: np.ndarray  # [signals, n]
    normalized: np.ndarray  # [signals, n]
    weights: np.ndarray  # [signals]

    @property
    def contributions(self) -> np.ndarray:
        return self.normalized * self.weights[:, None]


def blend(signals: Mapping[str, np.ndarray], policy: Mapping[str, SignalPolicy]) -> Blend:
    """Blend the signals present in both `signals` and `policy` (in the policy's order)."""
    names = tuple(name for name in policy if name in signals)
    if not names:
        raise ValueError("no signal to blend")
    raw = np.stack([np.asarray(signals[name], dtype=np.float64) for name in names])
    normalized = np.stack(
        [normalize(prepare(raw[i], policy[name]), policy[name].normalization) for i, name in enumerate(names)]
    )
    weights = np.array([policy[name].weight for name in names], dtype=np.float64)
    final = (normalized * weights[:, None]).sum(axis=0)
    return Blend(final=final, names=names, raw=raw, normalized=normalized, weights=weights)
