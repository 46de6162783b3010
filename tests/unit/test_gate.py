"""The release gate: refuse a dev regression, allow it with the override, compare like with like."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from offline.gate import GateRefused, check


def manifest(
    ndcg: float | None,
    judgments: str = "j1",
    seed: int = 13,
    release: str = "old",
    catalog: str = "c1",
    limit: int | None = None,
) -> dict[str, Any]:
    metrics = {} if ndcg is None else {"dev": {"dev_ndcg@10": ndcg}}
    data = {"judgments_sha256": judgments, "split": {"seed": seed}, "catalog_sha256": catalog, "catalog_limit": limit}
    return {"release_id": release, "metrics": metrics, "data": data}


def current(tmp_path: Path, ndcg: float | None, **kwargs: Any) -> Path:
    (tmp_path / "manifest.json").write_text(json.dumps(manifest(ndcg, **kwargs)))
    return tmp_path


def test_first_release_passes(tmp_path: Path) -> None:
    assert check(manifest(0.3), tmp_path / "nothing", allow_regression=False).decision == "first release"


def test_better_or_equal_passes(tmp_path: Path) -> None:
    decision = check(manifest(0.40), current(tmp_path, 0.39), allow_regression=False)
    assert decision.decision == "passed" and decision.previous == 0.39 and decision.previous_release == "old"


def test_regression_is_refused_unless_overridden(tmp_path: Path) -> None:
    with pytest.raises(GateRefused, match=r"0.3800 is worse than the current release's 0.3900 \(old\)"):
        check(manifest(0.38), current(tmp_path, 0.39), allow_regression=False)
    assert check(manifest(0.38), current(tmp_path, 0.39), allow_regression=True).decision == "overridden"


@pytest.mark.parametrize("kwargs", [{"judgments": "other"}, {"seed": 7}, {"catalog": "c2"}, {"limit": 2000}])
def test_other_judgments_split_or_corpus_are_not_compared(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    decision = check(manifest(0.1), current(tmp_path, 0.39, **kwargs), allow_regression=False)
    assert decision.decision == "not comparable"


def test_missing_metric_is_not_compared(tmp_path: Path) -> None:
    assert check(manifest(None), current(tmp_path, 0.39), allow_regression=False).decision == "not comparable"


def test_a_release_without_judgments_is_not_compared(tmp_path: Path) -> None:
    new = manifest(0.1)
    new["data"]["split"] = None  # offline.export without --judgments
    assert check(new, current(tmp_path, 0.39), allow_regression=False).decision == "not comparable"
