"""Ranking metrics as ../shared/data/README.md defines them: NDCG@k, Recall@k and MRR, pure Python/numpy.

Conventions (the README's): gain = relevance − 1, so a 1 ("irrelevant") earns nothing, and an
unjudged item counts as 0. The ideal DCG ranks ALL judged items of the query, not only those
retrieved, so a system is not rewarded for retrieving few. An item is relevant when its
relevance is ≥ 2; Recall@k divides by the number of relevant judged items. Systems are compared
over queries with at least MIN_RELEVANT relevant judged items (`qualifies`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RELEVANT = 2.0
MIN_RELEVANT = 3


def _discounts(n: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))


def dcg(gains: Sequence[float]) -> float:
    values = np.asarray(gains, dtype=np.float64)
    return float(np.sum(values * _discounts(len(values))))


def ndcg_at_k(ranked: Sequence[str], judged: Mapping[str, float], k: int = 10) -> float:
    """NDCG@k of a ranked list of item ids; 0 when the query has no judged item with gain > 0."""
    ideal = sorted((max(r - 1.0, 0.0) for r in judged.values()), reverse=True)[:k]
    ideal_dcg = dcg(ideal)
    if ideal_dcg <= 0:
        return 0.0
    # An item shown twice earns its gain once: the ideal list holds each judged item once.
    gains = [0.0 if item is None else max(judged.get(item, 1.0) - 1.0, 0.0) for item in _first_occurrences(ranked[:k])]
    return dcg(gains) / ideal_dcg


def _first_occurrences(ranked: Sequence[str]) -> list[str | None]:
    """The list with every repeat of an id replaced by None (no gain), positions kept."""
    seen: set[str] = set()
    out: list[str | None] = []
    for item in ranked:
        out.append(None if item in seen else item)
        seen.add(item)
    return out


def recall_at_k(ranked: Sequence[str], judged: Mapping[str, float], k: int = 100) -> float:
    """Share of the query's relevant judged items found in the top k; 0 when it has none."""
    relevant = {item for item, r in judged.items() if r >= RELEVANT}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def reciprocal_rank(ranked: Sequence[str], judged: Mapping[str, float], k: int | None = None) -> float:
    """1 / rank of the first relevant item (within the top k when given); 0 when none is found."""
    for rank, item in enumerate(ranked[:k] if k is not None else ranked, start=1):
        if judged.get(item, 0.0) >= RELEVANT:
            return 1.0 / rank
    return 0.0


def qualifies(judged: Mapping[str, float], min_relevant: int = MIN_RELEVANT) -> bool:
    """Whether a query counts in the README's comparison (≥ min_relevant relevant judged items)."""
    return sum(1 for r in judged.values() if r >= RELEVANT) >= min_relevant


def per_query(
    runs: Mapping[str, Sequence[str]],
    judgments: Mapping[str, Mapping[str, float]],
    *,
    ndcg_k: int = 10,
    recall_k: int = 100,
    min_relevant: int = MIN_RELEVANT,
) -> dict[str, np.ndarray]:
    """Each metric for each qualifying query (in judgments order); a missing run is an empty list."""
    queries = [q for q, judged in judgments.items() if qualifies(judged, min_relevant)]
    return {
        f"ndcg@{ndcg_k}": np.array([ndcg_at_k(runs.get(q, []), judgments[q], ndcg_k) for q in queries]),
        f"recall@{recall_k}": np.array([recall_at_k(runs.get(q, []), judgments[q], recall_k) for q in queries]),
        "mrr": np.array([reciprocal_rank(runs.get(q, []), judgments[q]) for q in queries]),
    }


def evaluate(
    runs: Mapping[str, Sequence[str]],
    judgments: Mapping[str, Mapping[str, float]],
    *,
    ndcg_k: int = 10,
    recall_k: int = 100,
    min_relevant: int = MIN_RELEVANT,
) -> dict[str, float]:
    """Mean metrics over the queries of `runs` that qualify; a missing run counts as an empty list."""
    values = per_query(runs, judgments, ndcg_k=ndcg_k, recall_k=recall_k, min_relevant=min_relevant)
    count = len(next(iter(values.values())))
    return {"queries": count, **{name: float(v.mean()) if count else 0.0 for name, v in values.items()}}


def bootstrap_ci(values: np.ndarray, *, samples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean, resampling queries with replacement."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return (float(low), float(high))


def ild_at_k(embeddings: np.ndarray, k: int = 10) -> float:
    """Intra-list diversity of the top k: 1 − mean pairwise cosine similarity of their embeddings.

    Rows are L2-normalised first (a zero row stays zero). 0 for fewer than two items; identical
    items give 0, orthogonal ones 1 (and anti-correlated ones up to 2).
    """
    x = np.asarray(embeddings, dtype=np.float64)[:k]
    n = len(x)
    if n < 2:
        return 0.0
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    sims = x @ x.T
    mean_pairwise = (sims.sum() - np.trace(sims)) / (n * (n - 1))
    return float(1.0 - mean_pairwise)


def coverage_at_k(values: Sequence[str | None], k: int = 10) -> int:
    """How many distinct non-null values (categories, brands) the top k shows: a count, 0..k, not a share."""
    return len({v for v in list(values)[:k] if v is not None})
