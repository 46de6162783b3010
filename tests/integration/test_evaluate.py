"""`python -m offline.evaluate` on the example release: the JSON a user reads, with sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import EXAMPLES, ROOT

pytestmark = pytest.mark.slow


def evaluate(release: Path, *extra: str) -> dict[str, object]:
    command = [
        sys.executable,
        "-m",
        "offline.evaluate",
        "--release",
        str(release),
        "--products",
        str(EXAMPLES / "catalog.csv"),
        "--judgments",
        str(EXAMPLES / "judgments.csv"),
        "--json",
        "--quiet",
        *extra,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_evaluate_prints_metrics_intervals_and_the_ablation(example_release: Path, tmp_path: Path) -> None:
    plot = tmp_path / "stages.png"
    result = evaluate(example_release, "--split", "all", "--plot", str(plot))
    assert {"ndcg@10", "recall@100", "mrr", "queries", "release_id", "split", "ci95"} <= set(result)
    assert result["queries"] > 50
    # The example judgments are clean: a working pipeline ranks them far above chance.
    assert float(result["ndcg@10"]) > 0.6  # type: ignore[arg-type]
    assert float(result["recall@100"]) > 0.9  # type: ignore[arg-type]
    low, high = result["ci95"]["ndcg@10"]  # type: ignore[index]
    assert low <= result["ndcg@10"] <= high
    stages = {row["stage"]: row for row in result["ablation"]}  # type: ignore[attr-defined]
    assert list(stages) == ["bm25", "dense (pretrained)", "hybrid_rrf", "hybrid_ranker"]
    # The full-pipeline stage is the default path, so it reproduces the headline numbers.
    assert stages["hybrid_ranker"]["ndcg@10"] == result["ndcg@10"]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_dev_split_is_a_subset(example_release: Path) -> None:
    every = evaluate(example_release, "--split", "all")
    dev = evaluate(example_release, "--split", "dev")
    assert 0 < int(dev["queries"]) < int(every["queries"])  # type: ignore[call-overload]


def test_a_different_catalog_is_refused(example_release: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.csv"
    other.write_text("item_id,title\nx1,some other product\n")
    command = [
        sys.executable,
        "-m",
        "offline.evaluate",
        "--release",
        str(example_release),
        "--products",
        str(other),
        "--judgments",
        str(EXAMPLES / "judgments.csv"),
        "--json",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "evaluate the release built from this catalog" in done.stderr


def test_mmr_diversifies_the_top_10_at_a_small_cost(example_release: Path) -> None:
    plain = evaluate(example_release, "--split", "dev")
    mmr = evaluate(example_release, "--split", "dev", "--diversity", "mmr", "--diversity-strength", "0.5")
    assert plain["attributes"] == mmr["attributes"] == "given"  # the example catalog has categories and brands
    assert mmr["diversity"] == {
        "method": "mmr",
        "strength": 0.5,
        "max_per_category": 0,
        "max_per_brand": 0,
        "window": 0,
    }
    # The same queries, a more varied top 10: less similar items, more categories and brands.
    assert mmr["queries"] == plain["queries"]
    assert float(mmr["ild@10"]) > float(plain["ild@10"])  # type: ignore[arg-type]
    assert float(mmr["category_coverage@10"]) > float(plain["category_coverage@10"])  # type: ignore[arg-type]
    assert float(mmr["brand_coverage@10"]) >= float(plain["brand_coverage@10"])  # type: ignore[arg-type]
    assert 0 < float(mmr["ndcg@10"]) < float(plain["ndcg@10"])  # type: ignore[arg-type]
