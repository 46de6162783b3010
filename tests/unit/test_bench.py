"""ranker.bench's summaries over rounds and its paired comparison of two servers (pure functions; the CLI against
a real server is in tests/integration/test_rank_e2e.py)."""

from __future__ import annotations

import pytest

from ranker.bench import Summary, combine, paired, parse_args


def _run(qps: float, p50: float, p99: float, *, errors: dict[str, int] | None = None, stage: float = 1.0) -> Summary:
    return {
        "concurrency": 16,
        "requests": int(qps * 5),
        "qps": qps,
        "p50_ms": p50,
        "p95_ms": p50 * 1.5,
        "p99_ms": p99,
        "errors": sum((errors or {}).values()),
        "errors_by_code": errors or {},
        "degraded": 1,
        "stage_p50_ms": {"encode": stage, "score": 2 * stage},
    }


def test_combine_takes_medians_and_totals() -> None:
    rounds = [
        _run(100, 10, 30, stage=1.0),
        _run(300, 8, 20, errors={"UNAVAILABLE": 2}, stage=3.0),
        _run(200, 12, 25, errors={"UNAVAILABLE": 1, "DEADLINE_EXCEEDED": 4}, stage=2.0),
    ]
    out = combine(rounds)
    assert out["rounds"] == 3 and out["concurrency"] == 16
    assert out["qps"] == 200 and out["p50_ms"] == 10 and out["p99_ms"] == 25
    assert out["qps_runs"] == [100, 300, 200]
    assert out["requests"] == 3000 and out["degraded"] == 3
    assert out["errors"] == 7 and out["errors_by_code"] == {"UNAVAILABLE": 3, "DEADLINE_EXCEEDED": 4}
    assert out["stage_p50_ms"] == {"encode": 2.0, "score": 4.0}


def test_paired_ratios_are_per_round_then_median() -> None:
    # The machine slows down across the rounds; the compared server is 10% faster in every round.
    target = [_run(200, 10, 20), _run(100, 20, 40), _run(150, 14, 30)]
    compare = [_run(220, 9, 19), _run(110, 18, 41), _run(165, 12.6, 27)]
    out = paired(target, compare)
    assert out["rounds"] == 3
    assert out["qps_ratio"] == pytest.approx(1.1)
    assert out["qps_compare_better"] == 3
    assert out["p50_ms_ratio"] == pytest.approx(0.9)
    assert out["p50_ms_compare_better"] == 3
    assert out["p99_ms_ratio"] == pytest.approx(0.95)
    assert out["p99_ms_compare_better"] == 2  # 41 > 40 in the second round


def test_paired_with_a_dead_target_has_no_ratio() -> None:
    out = paired([_run(0, 0, 0)], [_run(100, 10, 20)])
    assert out["qps_ratio"] is None and out["qps_compare_better"] == 1


def test_rounds_and_channels_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--queries", "q.txt", "--rounds", "0"])
    assert parse_args(["--queries", "q.txt", "--compare", "b:1", "--rounds", "4"]).compare == "b:1"
    with pytest.raises(SystemExit):
        parse_args(["--queries", "q.txt", "--channels", "0"])
    assert parse_args(["--queries", "q.txt", "--channels", "16"]).channels == 16
