"""Item-to-item neighbours learned offline from shoppers' item sequences: a release artifact (neighbours.npz).

For items a and b, count how often b appears within `window` positions of a in the same sequence
(either side, weighted 1/distance); keep, per item a, the top_k items b by P(b | a) = count(a, b) /
sum over b' of count(a, b'). Also keep each item's number of interactions (a popularity prior).
The online scorer only reads this; nothing is learned per event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

NEIGHBOURS_FILE = "neighbours.npz"
DEFAULT_WINDOW = 5
DEFAULT_TOP_K = 100


@dataclass(frozen=True, kw_only=True)
class ItemNeighbours:
    """Sparse rows (CSR) over item rows: row a's neighbours are indices[indptr[a]:indptr[a + 1]]."""

    indptr: np.ndarray  # int64 [items + 1]
    indices: np.ndarray  # int64, neighbour rows
    weights: np.ndarray  # float32, P(b | a)
    counts: np.ndarray  # float64 [items], interactions per item in the training sequences

    @property
    def num_items(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def build(
        cls,
        sequences: Iterable[Sequence[int]],
        num_items: int,
        *,
        window: int = DEFAULT_WINDOW,
        top_k: int = DEFAULT_TOP_K,
    ) -> ItemNeighbours:
        """From item-row sequences (oldest first); deterministic (ties by row)."""
        firsts: list[np.ndarray] = []
        seconds: list[np.ndarray] = []
        values: list[np.ndarray] = []
        counts = np.zeros(num_items, dtype=np.float64)
        for sequence in sequences:
            seq = np.asarray(sequence, dtype=np.int64)
            np.add.at(counts, seq, 1.0)
            for distance in range(1, min(window, len(seq) - 1) + 1):
                a, b = seq[:-distance], seq[distance:]
                keep = a != b
                a, b = a[keep], b[keep]
                firsts += [a, b]
                seconds += [b, a]
                values += [np.full(len(a), 1.0 / distance)] * 2
        if not firsts:
            return cls(
                indptr=np.zeros(num_items + 1, np.int64),
                indices=np.zeros(0, np.int64),
                weights=np.zeros(0, np.float32),
                counts=counts,
            )
        first = np.concatenate(firsts)
        second = np.concatenate(seconds)
        value = np.concatenate(values)
        codes, inverse = np.unique(first * num_items + second, return_inverse=True)
        summed = np.bincount(inverse, weights=value)
        a, b = codes // num_items, codes % num_items
        totals = np.bincount(a, weights=summed, minlength=num_items)
        probability = summed / totals[a]
        # Per row a: highest probability first, ties by b; then keep the first top_k of each row.
        order = np.lexsort((b, -probability, a))
        a, b, probability = a[order], b[order], probability[order]
        starts = np.searchsorted(a, np.arange(num_items))
        rank = np.arange(len(a)) - starts[a]
        keep = rank < top_k
        a, b, probability = a[keep], b[keep], probability[keep]
        indptr = np.zeros(num_items + 1, dtype=np.int64)
        np.cumsum(np.bincount(a, minlength=num_items), out=indptr[1:])
        return cls(indptr=indptr, indices=b.astype(np.int64), weights=probability.astype(np.float32), counts=counts)

    def save(self, path: Path, item_ids: Sequence[str]) -> None:
        """Keyed by item id, so a catalog with other rows (or items added online) still maps it."""
        if len(item_ids) != self.num_items:
            raise ValueError(f"{len(item_ids)} item ids for {self.num_items} rows")
        with path.open("wb") as f:
            np.savez(
                f,
                item_ids=np.array(list(item_ids), dtype=str),
                indptr=self.indptr,
                indices=self.indices,
                weights=self.weights,
                counts=self.counts,
            )

    @classmethod
    def load(cls, path: Path, row_of: Mapping[str, int], num_rows: int) -> ItemNeighbours:
        """The artifact in the catalog's row space; items the catalog lacks are dropped."""
        with np.load(path, allow_pickle=False) as data:
            item_ids = data["item_ids"].tolist()
            indptr, indices, weights, counts = data["indptr"], data["indices"], data["weights"], data["counts"]
        row = np.array([row_of.get(i, -1) for i in item_ids], dtype=np.int64)
        owner = np.repeat(np.arange(len(item_ids)), np.diff(indptr))
        a, b = row[owner], row[indices]
        keep = (a >= 0) & (b >= 0)
        a, b, w = a[keep], b[keep], weights[keep]
        order = np.lexsort((b, a))
        a, b, w = a[order], b[order], w[order]
        new_indptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(a, minlength=num_rows), out=new_indptr[1:])
        new_counts = np.zeros(num_rows, dtype=np.float64)
        new_counts[row[row >= 0]] = counts[row >= 0]
        return cls(indptr=new_indptr, indices=b, weights=w.astype(np.float32), counts=new_counts)

    def moved(self, moves: Mapping[int, int], num_rows: int) -> ItemNeighbours:
        """The same neighbours over `num_rows` rows, with each row `old` of `moves` now at row `new`: an item
        updated online gets a new row, and its interactions and neighbours go with it."""
        remap = np.arange(max(num_rows, self.num_items), dtype=np.int64)
        for old, new in moves.items():
            if old < self.num_items:
                remap[old] = new
        owner = np.repeat(np.arange(self.num_items, dtype=np.int64), np.diff(self.indptr))
        a, b = remap[owner], remap[self.indices]
        order = np.argsort(a, kind="stable")  # within a row, the stored order (best first) is kept
        indptr = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(a, minlength=num_rows), out=indptr[1:])
        counts = np.zeros(num_rows, dtype=np.float64)
        known = min(len(self.counts), num_rows)
        counts[:known] = self.counts[:known]
        for old, new in moves.items():
            if old < len(self.counts):
                counts[new], counts[old] = self.counts[old], 0.0
        return ItemNeighbours(indptr=indptr, indices=b[order], weights=self.weights[order], counts=counts)

    def spread(self, rows: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
        """sum_j weights[j] * P(. | rows[j]) as a dense vector over `size` rows (rows past the artifact get 0)."""
        total = np.zeros(size, dtype=np.float64)
        for row, weight in zip(rows, weights, strict=True):
            if 0 <= row < self.num_items:
                start, end = self.indptr[row], self.indptr[row + 1]
                neighbours = self.indices[start:end]
                inside = neighbours < size
                total[neighbours[inside]] += weight * self.weights[start:end][inside]
        return total

    def popularity(self, rows: np.ndarray) -> np.ndarray:
        """log(1 + interactions) / log(1 + the most interactions), 0 for rows the artifact does not know."""
        rows = np.asarray(rows, dtype=np.int64)
        top = float(self.counts.max()) if len(self.counts) else 0.0
        if top <= 0:
            return np.zeros(len(rows))
        known = rows < len(self.counts)
        result = np.zeros(len(rows))
        result[known] = np.log1p(self.counts[rows[known]]) / np.log1p(top)
        return result
