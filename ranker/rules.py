"""Business rules: which items are excluded, how boosts and buries move scores, where pins go.

Precedence, applied by ranker.pipeline in this order:
  1. filters (category, price, in stock) and exclude rules — a row mask used during retrieval, so
     they never empty the page;
  2. the blend of model and business signals;
  3. boost and bury — each matching rule adds / subtracts its amount (component "rules");
  4. diversity (MMR / DPP / caps) over the unpinned items;
  5. pins — each pinned item goes to its position (component "pin"); pins are immune to diversity
     and do not count against caps; they still obey filters and excludes.
Policy rules come before a request's own; the first pin for a position or an item wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ranker.domain import Rule, RuleAction
from ranker.release import Catalog


def excluded(catalog: Catalog, rules: Sequence[Rule]) -> np.ndarray | None:
    """Boolean mask of excluded rows; None when no rule excludes."""
    masks = [catalog.matches(r) for r in rules if r.action is RuleAction.EXCLUDE]
    return np.logical_or.reduce(masks) if masks else None


def adjustments(catalog: Catalog, rules: Sequence[Rule], rows: np.ndarray) -> np.ndarray | None:
    """Score change per candidate row from boost/bury rules; None when there are none."""
    moving = [r for r in rules if r.action in (RuleAction.BOOST, RuleAction.BURY)]
    if not moving:
        return None
    total = np.zeros(len(rows), dtype=np.float64)
    for rule in moving:
        sign = 1.0 if rule.action is RuleAction.BOOST else -1.0
        total += sign * rule.amount * catalog.matches(rule)[rows]
    return total


def pins(catalog: Catalog, rules: Sequence[Rule], allowed: np.ndarray | None) -> list[tuple[int, int]]:
    """(position, row) of each applicable pin, by position; the first rule for a position or row wins."""
    taken_positions: set[int] = set()
    taken_rows: set[int] = set()
    result = []
    for rule in rules:
        if rule.action is not RuleAction.PIN:
            continue
        (item_id,) = rule.item_ids
        row = catalog.row_of.get(item_id)
        if row is None or (allowed is not None and not allowed[row]):
            continue
        if rule.position in taken_positions or row in taken_rows:
            continue
        taken_positions.add(rule.position)
        taken_rows.add(row)
        result.append((rule.position, row))
    return sorted(result)


def place(ranked: list[int], pinned: list[tuple[int, int]], k: int) -> tuple[list[int], set[int]]:
    """Insert pinned entries (position, entry) into a ranked list; returns the top k and the pinned set.

    A pin whose position is past the end of a shorter list goes last; a pin past k is not shown.
    """
    out = list(ranked)
    for position, entry in pinned:
        if position <= k:
            out.insert(min(position - 1, len(out)), entry)
    chosen = out[:k]
    return chosen, {entry for _, entry in pinned} & set(chosen)


def pin_scores(scores: np.ndarray, is_pin: Sequence[bool], epsilon: float = 1e-6) -> np.ndarray:
    """Move each pinned item's score between its neighbours' so the list stays ordered by score: at least
    the next item's (plus epsilon where there is room), at most the previous item's. A run of pins stays in
    its placed order. The unpinned items must already be ordered by score; their scores do not change."""
    out = np.asarray(scores, dtype=np.float64).copy()
    for i in reversed(range(len(out) - 1)):
        if is_pin[i]:
            out[i] = max(out[i], out[i + 1] + epsilon)
    for i in range(1, len(out)):
        if is_pin[i]:
            out[i] = min(out[i], out[i - 1])
    return out
