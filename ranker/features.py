"""Query–item feature rows for the learned ranker: one implementation, used online and offline.

The ranker model (Triton model `ranker`) takes rows of exactly FEATURE_NAMES, in this order; the
export writes the names into the release manifest and the service refuses a release whose list
differs. Features relative to the candidate set (gaps and ranks) make scores comparable across
queries of very different BM25 scale.
"""

from __future__ import annotations

import itertools
import re
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
    "query_trigram_coverage",
    "query_number_match",
    "last_query_term_in_title",
)
NUM_FEATURES = len(FEATURE_NAMES)

_NUMBER = re.compile(r"\d+")
NO_NUMBER = 0.5  # query_number_match when the query has no number: neither a match nor a miss


def _reciprocal_rank(values: np.ndarray) -> np.ndarray:
    """1 / (1 + rank) with rank 0 for the highest value; ties keep candidate order."""
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float32)
    ranks[order] = np.arange(len(values), dtype=np.float32)
    return 1.0 / (1.0 + ranks)


def _bigrams(tokens: Sequence[str]) -> set[tuple[str, str]]:
    return set(itertools.pairwise(tokens))


def _trigram_codes(text: bytes) -> np.ndarray:
    """Each 3-byte window of `text` as one int32."""
    b = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
    return (b[:-2] << 16) | (b[1:-1] << 8) | b[2:]


def trigram_coverage(query_text: str, item_texts: Sequence[str]) -> np.ndarray:
    """Share of the query's distinct character trigrams (lower-cased, space-padded, UTF-8 bytes) found in
    each item text. Survives the typos and split or joined words that defeat term matching
    ("dewalt driil", "2x4" vs "2 x 4"). Vectorised over all candidates at once."""
    out = np.zeros(len(item_texts), dtype=np.float32)
    query = np.unique(_trigram_codes(f" {query_text.lower()} ".encode()))
    if len(query) == 0 or not item_texts:
        return out
    encoded = [f" {t.lower()} ".encode() for t in item_texts]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    codes = _trigram_codes(b"".join(encoded))
    owner = np.repeat(np.arange(len(encoded)), lengths)[: len(codes)]
    ends = np.cumsum(lengths)
    inside = np.arange(len(codes)) + 3 <= ends[owner]  # windows that do not straddle two texts
    slot = np.minimum(np.searchsorted(query, codes), len(query) - 1)
    hit = inside & (query[slot] == codes)
    present = np.zeros((len(encoded), len(query)), dtype=bool)
    present[owner[hit], slot[hit]] = True
    out[:] = present.sum(axis=1) / len(query)
    return out


def number_match(query_text: str, item_texts: Sequence[str]) -> np.ndarray:
    """Share of the query's numbers (digit runs: sizes, voltages, counts) that appear as numbers in each
    item text; NO_NUMBER when the query has none."""
    numbers = set(_NUMBER.findall(query_text))
    if not numbers:
        return np.full(len(item_texts), NO_NUMBER, dtype=np.float32)
    return np.fromiter(
        (len(numbers.intersection(_NUMBER.findall(t))) / len(numbers) for t in item_texts),
        dtype=np.float32,
        count=len(item_texts),
    )


def assemble(
    query_text: str,
    query_tokens: Sequence[str],
    item_texts: Sequence[str],
    item_tokens: Sequence[Sequence[str]],
    dense: np.ndarray,
    bm25: np.ndarray,
) -> np.ndarray:
    """Feature matrix [len(item_tokens), NUM_FEATURES] (float32) for one query's candidates.

    query_text / item_texts: the raw query and item titles; query_tokens / item_tokens: their
    analysed terms (retrieval.Analyzer); dense: cosine of the query embedding with each candidate
    (0 where no embedding is available); bm25: each candidate's BM25 score against the query.
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
    last_term = query_tokens[-1] if query_tokens else None
    # Plain Python lists in the loop, one column assignment each after it: per-element NumPy writes
    # cost more than the set operations themselves (~700 candidates per request).
    shared = [len(query_terms.intersection(tokens)) for tokens in item_tokens]
    distinct = [len(set(tokens)) for tokens in item_tokens]
    out[:, 6] = np.asarray(shared, dtype=np.float32) / len(query_terms) if query_terms else 0.0
    out[:, 7] = [s / d if d else 0.0 for s, d in zip(shared, distinct, strict=True)]
    if query_pairs:
        out[:, 8] = [len(query_pairs & _bigrams(tokens)) / len(query_pairs) for tokens in item_tokens]
    out[:, 9] = np.log1p([len(tokens) for tokens in item_tokens])
    # The last term of a shop query is usually the product type ("cordless drill", "deck screws").
    if last_term is not None:
        out[:, 13] = [last_term in tokens for tokens in item_tokens]
    out[:, 10] = np.log1p(len(query_tokens))
    out[:, 11] = trigram_coverage(query_text, item_texts)
    out[:, 12] = number_match(query_text, item_texts)
    return out
