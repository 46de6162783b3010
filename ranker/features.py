"""Query–item feature rows for the learned ranker: one implementation, used online and offline.

The ranker model (Triton model `ranker`) takes rows of exactly FEATURE_NAMES, in this order; the
export writes the names into the release manifest and the service refuses a release whose list
differs. Features relative to the candidate set (gaps and ranks) make scores comparable across
queries of very different BM25 scale.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

FEATURE_NAMES: tuple[str, ...] = (
    "dense_cosine",
    "dense_gap_to_best",
    "dense_rank_reciprocal",
    "bm25",
    "bm25_ratio_to_best",
    "bm25_rank_reciprocal",
    "query_term_coverage",
    "title_term_precision",
    "query_bigram_coverage",
    "log_title_terms",
    "log_query_terms",
)
NUM_FEATURES = len(FEATURE_NAMES)


def _reciprocal_rank(values: np.ndarray) -> np.ndarray:
    """1 / (1 + rank) with rank 0 for the highest value; ties keep candidate order."""
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float32)
    ranks[order] = np.arange(len(values), dtype=np.float32)
    return 1.0 / (1.0 + ranks)


def _bigrams(tokens: Sequence[str]) -> set[tuple[str, str]]:
    return set(itertools.pairwise(tokens))


def assemble(
    query_tokens: Sequence[str],
    item_tokens: Sequence[Sequence[str]],
    dense: np.ndarray,
    bm25: np.ndarray,
) -> np.ndarray:
    """Feature matrix [len(item_tokens), NUM_FEATURES] (float32) for one query's candidates.

    query_tokens / item_tokens: analysed terms (retrieval.Analyzer); dense: cosine of the query
    embedding with each candidate (0 where no embedding is available); bm25: each candidate's
    BM25 score against the query.
    """
    n = len(item_tokens)
    out = np.zeros((n, NUM_FEATURES), dtype=np.float32)
    if n == 0:
        return out
    dense = np.asarray(dense, dtype=np.float32)
    bm25 = np.asarray(bm25, dtype=np.float32)
    best_bm25 = float(bm25.max())

    out[:, 0] = dense
    out[:, 1] = dense - dense.max()
    out[:, 2] = _reciprocal_rank(dense)
    out[:, 3] = bm25
    out[:, 4] = bm25 / best_bm25 if best_bm25 > 0 else 0.0
    out[:, 5] = _reciprocal_rank(bm25) if best_bm25 > 0 else 0.0

    query_terms = set(query_tokens)
    query_pairs = _bigrams(query_tokens)
    for i, tokens in enumerate(item_tokens):
        title_terms = set(tokens)
        shared = len(query_terms & title_terms)
        out[i, 6] = shared / len(query_terms) if query_terms else 0.0
        out[i, 7] = shared / len(title_terms) if title_terms else 0.0
        out[i, 8] = len(query_pairs & _bigrams(tokens)) / len(query_pairs) if query_pairs else 0.0
        out[i, 9] = np.log1p(len(tokens))
    out[:, 10] = np.log1p(len(query_tokens))
    return out
