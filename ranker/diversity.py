"""Choosing the top k from blended candidates: plain order, MMR or greedy DPP, under per-attribute caps.

All selectors are greedy, deterministic (candidates arrive sorted by score then item id, and every
argmax takes the first maximum) and pure numpy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from ranker.domain import DiversityMethod, DiversitySpec


class _Caps:
    """Tracks how many items of each category and brand are selected."""

    def __init__(self, spec: DiversitySpec, categories: Sequence[str | None], brands: Sequence[str | None]) -> None:
        self._limits = [
            (spec.max_per_category, categories, Counter[str | None]()),
            (spec.max_per_brand, brands, Counter[str | None]()),
        ]
        self._limits = [entry for entry in self._limits if entry[0] > 0]

    def allows(self, i: int) -> bool:
        return all(values[i] is None or counts[values[i]] < limit for limit, values, counts in self._limits)

    def take(self, i: int) -> None:
        for _, values, counts in self._limits:
            if values[i] is not None:
                counts[values[i]] += 1


def select(
    relevance: np.ndarray,
    embeddings: np.ndarray,
    spec: DiversitySpec,
    k: int,
    categories: Sequence[str | None],
    brands: Sequence[str | None],
) -> list[int]:
    """Indices of the chosen candidates, in display order.

    relevance: blended scores, candidates already sorted best first (ties by item id);
    embeddings: L2-normalised rows aligned with relevance. Items of unknown category/brand are not
    capped. Fewer than k come back when the caps leave fewer eligible items.
    """
    n = len(relevance)
    k = min(k, n)
    caps = _Caps(spec, categories, brands)
    if spec.method is DiversityMethod.NONE or spec.strength <= 0 or k <= 1:
        return _in_order(n, k, caps)
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.zeros(n)
    if spec.method is DiversityMethod.MMR:
        return _mmr(rel, embeddings, spec.strength, k, caps)
    return _dpp(rel, embeddings, spec.strength, k, caps)


def _in_order(n: int, k: int, caps: _Caps) -> list[int]:
    chosen: list[int] = []
    for i in range(n):
        if len(chosen) == k:
            break
        if caps.allows(i):
            caps.take(i)
            chosen.append(i)
    return chosen


def _mmr(rel: np.ndarray, emb: np.ndarray, strength: float, k: int, caps: _Caps) -> list[int]:
    """Maximal marginal relevance: (1 - s) * relevance - s * max cosine to the already chosen."""
    n = len(rel)
    max_sim = np.full(n, -np.inf)
    available = np.ones(n, dtype=bool)
    chosen: list[int] = []
    while len(chosen) < k:
        for i in np.flatnonzero(available):
            if not caps.allows(int(i)):
                available[i] = False
        if not available.any():
            break
        redundancy = np.where(np.isfinite(max_sim), max_sim, 0.0)
        gain = np.where(available, (1 - strength) * rel - strength * redundancy, -np.inf)
        best = int(np.argmax(gain))
        chosen.append(best)
        caps.take(best)
        available[best] = False
        max_sim = np.maximum(max_sim, emb @ emb[best])
    return chosen


def _dpp(rel: np.ndarray, emb: np.ndarray, strength: float, k: int, caps: _Caps) -> list[int]:
    """Greedy MAP inference of a DPP with kernel L = diag(q) S diag(q) (Chen, Zhang & Zhou, 2018).

    q = exp(alpha * relevance) with alpha = (1 - s) / (2 s), the paper's relevance/diversity
    trade-off; S = cosine similarity. Incremental Cholesky updates make each step O(n * chosen).
    """
    n = len(rel)
    alpha = (1 - strength) / (2 * strength)
    quality = np.exp(alpha * (rel - 1.0))  # shifted so the largest quality is 1: no overflow
    feats = emb * quality[:, None]  # L = feats @ feats.T
    gains = np.einsum("ij,ij->i", feats, feats) + 1e-9  # diag(L): marginal gain of each item
    cis = np.zeros((k, n))
    available = np.ones(n, dtype=bool)
    chosen: list[int] = []
    while len(chosen) < k:
        for i in np.flatnonzero(available):
            if not caps.allows(int(i)):
                available[i] = False
        if not available.any():
            break
        best = int(np.argmax(np.where(available, gains, -np.inf)))
        if gains[best] <= 1e-12 and chosen:
            # Every remaining item is (numerically) spanned by the chosen ones: fall back to relevance.
            best = int(np.argmax(np.where(available, rel, -np.inf)))
        step = len(chosen)
        chosen.append(best)
        caps.take(best)
        available[best] = False
        if gains[best] > 1e-12:
            e = (feats @ feats[best] - cis[:step].T @ cis[:step, best]) / np.sqrt(gains[best])
            cis[step] = e
            gains = gains - e * e
    return chosen


def monotone_scores(scores: np.ndarray, epsilon: float = 1e-6) -> np.ndarray:
    """Scores for a chosen order made non-increasing: what diversity adds is the difference."""
    out = np.asarray(scores, dtype=np.float64).copy()
    for i in range(1, len(out)):
        if out[i] > out[i - 1]:  # promoted above a better-scored item: pull it just below
            out[i] = out[i - 1] - epsilon
    return out
