"""Query–item feature rows for the learned ranker: one implementation, used online and offline.

The ranker model (Triton model `ranker`) takes rows of exactly FEATURE_NAMES, in this order; the
export writes the names into the release manifest and the service refuses a release whose list
differs. Features relative to the candidate set (gaps and ranks) make scores comparable across
queries of very different BM25 scale.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ranker.mapped import populate

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


# A title's matchable units, each one int code: its character trigrams (3 UTF-8 bytes, below
# TRIGRAM_SPACE), then its analysed terms, term bigrams and numbers, numbered from TRIGRAM_SPACE on
# in the order TitleIndex first meets them.
TRIGRAM_SPACE = 1 << 24
_TERM, _BIGRAM, _NUMBER_UNIT = "t", "b", "n"
# Columns of TitleIndex.matches: how many of the query's distinct units of each kind the title has.
TERMS, BIGRAMS, TRIGRAMS, NUMBERS, LAST_TERM = range(5)
_KIND_OF_PREFIX = {_TERM: TERMS, _BIGRAM: BIGRAMS, _NUMBER_UNIT: NUMBERS}


def _trigram_codes(text: bytes) -> np.ndarray:
    """Each 3-byte window of `text` as one int64."""
    b = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    return (b[:-2] << 16) | (b[1:-1] << 8) | b[2:]


def _padded(text: str) -> bytes:
    """What trigrams are taken from: lower-cased, one space each side (word starts and ends count)."""
    return f" {text.lower()} ".encode()


def _string_units(tokens: Sequence[str], text: str) -> set[str]:
    units = {_TERM + t for t in tokens}
    units.update(f"{_BIGRAM}{a} {b}" for a, b in itertools.pairwise(tokens))
    units.update(_NUMBER_UNIT + n for n in _NUMBER.findall(text))
    return units


TITLE_INDEX_FORMAT = 1  # of TitleIndex.save's files: a change of units or codes must change it
_ARRAYS = ("indptr", "codes", "title_terms", "distinct_terms")


class TitleIndex:
    """Every item title's distinct matchable units as one sparse row (CSR: `indptr`, `codes`), so a
    query's overlap features for hundreds of candidates are a few vectorised array operations instead
    of a Python loop of set intersections per candidate.

    Append-only like the catalog's rows: `appended` returns a new index and leaves this one valid. The
    unit vocabulary is shared and only grows, so codes stay stable across appended copies.
    """

    __slots__ = ("codes", "distinct_terms", "indptr", "title_terms", "vocabulary")

    def __init__(
        self,
        vocabulary: dict[str, int],
        indptr: np.ndarray,
        codes: np.ndarray,
        title_terms: np.ndarray,
        distinct_terms: np.ndarray,
    ) -> None:
        self.vocabulary = vocabulary
        self.indptr = indptr  # int64 [items + 1]
        self.codes = codes  # int32 unit codes, row i at codes[indptr[i]:indptr[i + 1]]
        self.title_terms = title_terms  # int32 analysed terms per title
        self.distinct_terms = distinct_terms  # int32 distinct analysed terms per title

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def save(self, directory: Path) -> None:
        """Write the index (the export does, so a release loads it instead of building it: 1M titles take
        ~40 s to build, well under a second to read)."""
        directory.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(directory / f"{name}.npy", getattr(self, name))
        units = sorted(self.vocabulary, key=self.vocabulary.__getitem__)  # unit i has code TRIGRAM_SPACE + i
        (directory / "vocabulary.json").write_text(json.dumps(units, ensure_ascii=False))
        (directory / "meta.json").write_text(json.dumps({"format": TITLE_INDEX_FORMAT, "items": len(self)}))

    @classmethod
    def load(cls, directory: Path, *, mapped: bool = True) -> TitleIndex | None:
        """The index save() wrote, or None when there is none or it is of another format (build it then).
        `mapped`: the arrays are the files mapped read-only (ranker.mapped), not copies."""
        meta_file = directory / "meta.json"
        if not meta_file.is_file() or json.loads(meta_file.read_text()).get("format") != TITLE_INDEX_FORMAT:
            return None
        units = json.loads((directory / "vocabulary.json").read_text(encoding="utf-8"))
        arrays = {}
        for name in _ARRAYS:
            path = directory / f"{name}.npy"
            if mapped:
                # A plain ndarray over the memmap (which it keeps alive): numpy's memmap subclass would wrap
                # the result of every operation on it.
                arrays[name] = np.asarray(np.load(path, mmap_mode="r"))
                populate(path)
            else:
                arrays[name] = np.load(path)
        return cls({unit: i for i, unit in enumerate(units)}, **arrays)

    @classmethod
    def build(cls, texts: Sequence[str], tokens: Sequence[Sequence[str]]) -> TitleIndex:
        empty = np.zeros(0, dtype=np.int32)
        return cls({}, np.zeros(1, dtype=np.int64), empty, empty, empty).appended(texts, tokens)

    def appended(self, texts: Sequence[str], tokens: Sequence[Sequence[str]]) -> TitleIndex:
        """This index with one row per (title, analysed terms) added after its rows."""
        if len(texts) != len(tokens):
            raise ValueError(f"{len(texts)} titles but {len(tokens)} token lists")
        n = len(texts)
        # Trigrams of all titles in one pass over their concatenation; windows across two titles dropped.
        encoded = [_padded(t) for t in texts]
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=n)
        codes = _trigram_codes(b"".join(encoded))
        owner = np.repeat(np.arange(n, dtype=np.int64), lengths)[: len(codes)]
        inside = np.arange(len(codes)) + 3 <= np.cumsum(lengths)[owner]
        keyed = np.unique((owner[inside] << 24) | codes[inside])  # distinct (title, trigram), by title
        vocabulary = self.vocabulary
        string_owner: list[int] = []
        string_codes: list[int] = []
        for i, (text, terms) in enumerate(zip(texts, tokens, strict=True)):
            units = [TRIGRAM_SPACE + vocabulary.setdefault(u, len(vocabulary)) for u in _string_units(terms, text)]
            string_codes.extend(units)
            string_owner.extend([i] * len(units))
        all_owner = np.concatenate([keyed >> 24, np.asarray(string_owner, dtype=np.int64)])
        all_codes = np.concatenate([keyed & (TRIGRAM_SPACE - 1), np.asarray(string_codes, dtype=np.int64)])
        order = np.argsort(all_owner, kind="stable")
        counts = np.bincount(all_owner, minlength=n)
        indptr = np.concatenate([self.indptr, self.indptr[-1] + np.cumsum(counts)])
        return TitleIndex(
            vocabulary,
            indptr,
            np.concatenate([self.codes, all_codes[order].astype(np.int32)]),
            np.concatenate([self.title_terms, np.array([len(t) for t in tokens], dtype=np.int32)]),
            np.concatenate([self.distinct_terms, np.array([len(set(t)) for t in tokens], dtype=np.int32)]),
        )

    def query_units(self, query_text: str, query_tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The query's distinct units as (sorted codes, their kind), and how many it has of each kind.
        A unit no title has is left out of the codes but still counts in the totals."""
        kinds: dict[int, int] = {}
        totals = np.zeros(4, dtype=np.int64)
        for code in np.unique(_trigram_codes(_padded(query_text))).tolist():
            kinds[code] = TRIGRAMS
            totals[TRIGRAMS] += 1
        for unit in _string_units(query_tokens, query_text):
            kind = _KIND_OF_PREFIX[unit[0]]
            totals[kind] += 1
            if unit in self.vocabulary:
                kinds[TRIGRAM_SPACE + self.vocabulary[unit]] = kind
        codes = np.array(sorted(kinds), dtype=np.int32)  # the dtype of TitleIndex.codes: no cast in searchsorted
        return codes, np.array([kinds[c] for c in codes.tolist()], dtype=np.int64), totals

    def matches(self, rows: np.ndarray, query_text: str, query_tokens: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """For each of `rows`: how many of the query's distinct terms, term bigrams, character trigrams
        and numbers its title has, and whether it has the query's last term ([len(rows), 5] int64,
        columns TERMS, BIGRAMS, TRIGRAMS, NUMBERS, LAST_TERM); and the query's totals per kind [4]."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        out = np.zeros((n, 5), dtype=np.int64)
        query_codes, query_kinds, totals = self.query_units(query_text, query_tokens)
        if n == 0 or len(query_codes) == 0:
            return out, totals
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        owner = np.repeat(np.arange(n, dtype=np.int64), lengths)
        first = np.cumsum(lengths) - lengths  # each row's first position in the gathered codes
        codes = self.codes[np.arange(len(owner), dtype=np.int64) + np.repeat(starts - first, lengths)]
        hit = np.isin(codes, query_codes)  # faster than searchsorted over all codes (numpy 1.26)
        kind = query_kinds[np.searchsorted(query_codes, codes[hit])]
        out[:, :4] = np.bincount(owner[hit] * 4 + kind, minlength=n * 4).reshape(n, 4)
        last = self.vocabulary.get(_TERM + query_tokens[-1]) if query_tokens else None
        if last is not None:
            out[:, LAST_TERM] = np.bincount(owner[codes == TRIGRAM_SPACE + last], minlength=n)
        return out, totals


def assemble(
    query_text: str,
    query_tokens: Sequence[str],
    titles: TitleIndex,
    rows: np.ndarray,
    dense: np.ndarray,
    bm25: np.ndarray,
) -> np.ndarray:
    """Feature matrix [len(rows), NUM_FEATURES] (float32) for one query's candidates.

    query_text / query_tokens: the raw query and its analysed terms (retrieval.Analyzer); titles: the
    catalog's TitleIndex and rows the candidates' rows in it; dense: cosine of the query embedding
    with each candidate (0 where no embedding is available); bm25: each candidate's BM25 score.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
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

    found, totals = titles.matches(rows, query_text, query_tokens)
    distinct = titles.distinct_terms[rows]
    if totals[TERMS]:
        out[:, 6] = found[:, TERMS] / totals[TERMS]
    out[:, 7] = np.divide(found[:, TERMS], distinct, out=np.zeros(n), where=distinct > 0)
    if totals[BIGRAMS]:
        out[:, 8] = found[:, BIGRAMS] / totals[BIGRAMS]
    out[:, 9] = np.log1p(titles.title_terms[rows])
    out[:, 10] = np.log1p(len(query_tokens))
    # Character trigrams survive the typos and split or joined words that defeat term matching
    # ("dewalt driil", "2x4" vs "2 x 4").
    if totals[TRIGRAMS]:
        out[:, 11] = found[:, TRIGRAMS] / totals[TRIGRAMS]
    # Numbers (digit runs: sizes, voltages, counts); NO_NUMBER when the query has none.
    out[:, 12] = found[:, NUMBERS] / totals[NUMBERS] if totals[NUMBERS] else NO_NUMBER
    # The last term of a shop query is usually the product type ("cordless drill", "deck screws").
    out[:, 13] = found[:, LAST_TERM] > 0
    return out
