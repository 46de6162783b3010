"""The stage benchmark CLI prints one JSON object with a timing per diversity method."""

from __future__ import annotations

import json

import pytest

from ranker import bench_stages


def test_bench_stages_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_stages.main(["--candidates", "40", "--top-k", "10", "--repeats", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["diversity"]) == {"none", "caps", "mmr", "dpp", "dpp+caps", "max_sum/10"}
    assert all(v["p50_ms"] > 0 for v in result["diversity"].values())
