"""Choosing the top k from blended candidates: plain order, MMR, max-sum or greedy DPP, under per-attribute caps.

All selectors are greedy, deterministic (candidates arrive sorted by score then item id, and every
argmax takes the first maximum) and pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ranker.domain import DiversityMethod, DiversitySpec


def _codes(values: Sequence[str | None]) -> tuple[np.ndarray, dict[str, int]]:
    """Integer code per value, -1 for unknown (never capped), and the code of each value."""
    index: dict[str, int] = {}
    codes = np.array([-1 if v is None else index.setdefault(v, len(index)) for v in values], dtype=np.int64)
    return codes, index


@dataclass(frozen=True)
class Placed:
    """Items the list shows that the selection does not choose (pins): their final positions (1-based) and
    their categories and brands, which count against the caps."""

    positions: frozenset[int] = frozenset()
    categories: Sequence[str | None] = ()
    brands: Sequence[str | None] = ()


@dataclass(frozen=True)
class Needs:
    """The candidate columns a spec's selection reads; select() may be given None for the others."""

    embeddings: bool
    categories: bool
    brands: bool


def needs(spec: DiversitySpec) -> Needs:
    return Needs(
        embeddings=spec.method is not DiversityMethod.NONE and spec.strength > 0,
        categories=spec.max_per_category > 0,
        brands=spec.max_per_brand > 0,
    )


class _Caps:
    """Eligibility under per-category and per-brand caps, updated as items are taken."""

    def __init__(
        self,
        spec: DiversitySpec,
        n: int,
        categories: Sequence[str | None] | None,
        brands: Sequence[str | None] | None,
        placed: Placed | None = None,
    ) -> None:
        self.eligible = np.ones(n, dtype=bool)
        self._limits = []
        for limit, values, already, name in (
            (spec.max_per_category, categories, placed.categories if placed else (), "categories"),
            (spec.max_per_brand, brands, placed.brands if placed else (), "brands"),
        ):
            if limit > 0:
                if values is None:
                    raise ValueError(f"a cap on {name} needs the candidates' {name}")
                codes, code_of = _codes(values)
                counts = np.zeros(len(code_of), dtype=np.int64)
                for value in already:  # items placed outside the selection (pins) fill the caps first
                    if value is not None and value in code_of:
                        counts[code_of[value]] += 1
                self.eligible &= ~np.isin(codes, np.flatnonzero(counts >= limit))
                self._limits.append((limit, codes, counts))

    def take(self, i: int) -> None:
        self.eligible[i] = False
        for limit, codes, counts in self._limits:
            code = codes[i]
            if code >= 0:
                counts[code] += 1
                if counts[code] >= limit:
                    self.eligible &= codes != code


def select(
    relevance: np.ndarray,
    embeddings: np.ndarray | None,
    spec: DiversitySpec,
    k: int,
    categories: Sequence[str | None] | None,
    brands: Sequence[str | None] | None,
    placed: Placed | None = None,
) -> list[int]:
    """Indices of the chosen candidates, in display order.

    relevance: blended scores, candidates already sorted best first (ties by item id);
    embeddings: L2-normalised rows aligned with relevance. Items of unknown category/brand are not
    capped. Fewer than k come back when the caps leave fewer eligible items. A column that
    needs(spec) says is not read may be None.

    With spec.window = w > 0 the list is filled w positions at a time: the selector starts afresh
    for each window (an item's redundancy counts only the items already in its window), and each
    window is shown in relevance order. Diversity then decides which items make a window, never
    that a less relevant item goes above a more relevant one in it, and the first window (a page
    of w) is the same whatever k is. Caps count over the whole list.

    `placed`: items shown at fixed positions without being selected (pins). They count against the caps, and
    a window's picks fill only the positions of that window they leave free.
    """
    n = len(relevance)
    k = min(k, n)
    caps = _Caps(spec, n, categories, brands, placed)
    if not needs(spec).embeddings or k <= 1:
        return _in_order(k, caps)
    if embeddings is None:
        raise ValueError(f"diversity method {spec.method.name} needs the candidates' embeddings")
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.zeros(n)
    emb = np.asarray(embeddings, dtype=np.float32)  # float32 products: half the cost, ample precision here
    pick = _SELECTORS[spec.method]
    if spec.window <= 0:
        return pick(rel, emb, spec.strength, k, caps)
    reserved = placed.positions if placed is not None else frozenset()
    chosen: list[int] = []
    start = 1  # the window's first position in the shown list
    while len(chosen) < k and caps.eligible.any():
        free = sum(position not in reserved for position in range(start, start + spec.window))
        start += spec.window
        if free:
            # Indices are positions in the relevance order, so sorting a window shows it best first.
            chosen.extend(sorted(pick(rel, emb, spec.strength, min(free, k - len(chosen)), caps)))
    return chosen


def _in_order(k: int, caps: _Caps) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < k and caps.eligible.any():
        best = int(np.argmax(caps.eligible))  # the first eligible: candidates are sorted best first
        chosen.append(best)
        caps.take(best)
    return chosen


def _mmr(rel: np.ndarray, emb: np.ndarray, strength: float, k: int, caps: _Caps) -> list[int]:
    """Maximal marginal relevance: (1 - s) * relevance - s * max cosine to the already chosen."""
    redundancy = np.zeros(len(rel))  # max cosine to the chosen; 0 before the first pick
    chosen: list[int] = []
    while len(chosen) < k and caps.eligible.any():
        gain = np.where(caps.eligible, (1 - strength) * rel - strength * redundancy, -np.inf)
        best = int(np.argmax(gain))
        similarity = emb @ emb[best]
        redundancy = similarity if not chosen else np.maximum(redundancy, similarity)
        chosen.append(best)
        caps.take(best)
    return chosen


def _max_sum(rel: np.ndarray, emb: np.ndarray, strength: float, k: int, caps: _Caps) -> list[int]:
    """Greedy max-sum diversification: (1 - s) * relevance - s * SUM of cosines to the already chosen.

    The objective of Gollapudi & Sharma (WWW 2009): relevance plus the sum of pairwise distances
    of the chosen set, which is what ILD (1 - mean pairwise cosine) measures. Unlike MMR's max, the
    sum grows with every pick, so the first picks stay close to relevance order and diversity acts
    mostly on the later positions, where displacing an item costs least. Useful strengths are ~10x
    smaller than MMR's (docs/diversity.md).
    """
    redundancy = np.zeros(len(rel))  # sum of cosines to the chosen
    chosen: list[int] = []
    while len(chosen) < k and caps.eligible.any():
        gain = np.where(caps.eligible, (1 - strength) * rel - strength * redundancy, -np.inf)
        best = int(np.argmax(gain))
        redundancy += emb @ emb[best]
        chosen.append(best)
        caps.take(best)
    return chosen


def _dpp(rel: np.ndarray, emb: np.ndarray, strength: float, k: int, caps: _Caps) -> list[int]:
    """Greedy MAP inference of a DPP with kernel L = diag(q) S diag(q) (Chen, Zhang & Zhou, 2018).

    q = exp(alpha * relevance) with alpha = (1 - s) / (2 s), the paper's relevance/diversity
    trade-off; S = cosine similarity. Incremental Cholesky updates make each step O(n * chosen).
    """
    # Capped: at the smallest strengths alpha overflows to inf, and inf * 0 (the top item) is NaN.
    alpha = min((1 - strength) / (2 * strength), 1e9)
    quality = np.exp(alpha * (rel - 1.0))  # shifted so the largest quality is 1: no overflow
    feats = emb * quality[:, None].astype(np.float32)  # L = feats @ feats.T, one column per step
    gains = np.einsum("ij,ij->i", feats, feats) + 1e-9  # diag(L): marginal gain of each item
    cis = np.zeros((k, len(rel)))
    chosen: list[int] = []
    while len(chosen) < k and caps.eligible.any():
        best = int(np.argmax(np.where(caps.eligible, gains, -np.inf)))
        if gains[best] <= 1e-12 and chosen:
            # Every remaining item is (numerically) spanned by the chosen ones: fall back to relevance.
            best = int(np.argmax(np.where(caps.eligible, rel, -np.inf)))
        step = len(chosen)
        chosen.append(best)
        caps.take(best)
        if gains[best] > 1e-12:
            e = (feats @ feats[best] - cis[:step].T @ cis[:step, best]) / np.sqrt(gains[best])
            cis[step] = e
            gains = gains - e * e
    return chosen


_SELECTORS = {DiversityMethod.MMR: _mmr, DiversityMethod.MAX_SUM: _max_sum, DiversityMethod.DPP: _dpp}


def monotone_scores(scores: np.ndarray, ids: Sequence[str], epsilon: float = 1e-6) -> np.ndarray:
    """Scores for a shown order made consistent with "by score, ties by id": an item above a better-scored
    one, or tied with it and shown first although its id sorts later, is pulled just below it. What an
    adjustment (diversity, a pin) changes is the difference."""
    out = np.asarray(scores, dtype=np.float64).copy()
    for i in range(1, len(out)):
        if out[i] > out[i - 1] or (out[i] == out[i - 1] and ids[i] < ids[i - 1]):
            out[i] = out[i - 1] - epsilon
    return out
