"""offline.bench_encoder on the CPU: every row measured, compared with fp32, and re-rendered from its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offline import bench_encoder


def test_cpu_run_measures_every_shape_and_matches_fp32(tmp_path: Path) -> None:
    args = bench_encoder.parse_args(
        [
            "--device",
            "cpu",
            "--backends",
            "torch,torch-graph",
            "--batch-sizes",
            "1,3",
            "--tokens",
            "5",
            "--repeats",
            "2",
        ]
    )
    result = bench_encoder.bench(args)
    rows = result["rows"]
    assert [(row["backend"], row["batch"]) for row in rows] == [("torch/fp32", 1), ("torch/fp32", 3)]
    assert all(row["min_cosine_to_fp32"] > 0.9999 and row["queries_per_s"] > 0 for row in rows)
    # What cannot run on a CPU is reported, not silently dropped.
    assert set(result["notes"]) == {"torch-graph", "torch/fp16"}

    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(result))
    bench_encoder.main(["--input", str(saved), "--plot", str(tmp_path / "plot.png")])
    assert (tmp_path / "plot.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backends", "tensorrt"], "--backends: unknown ['tensorrt']"),
        (["--dtypes", "int8"], "--dtypes: unknown ['int8']"),
        (["--tokens", "2"], "--tokens ≥ 3"),
    ],
)
def test_bad_options_are_refused_by_name(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_encoder.parse_args(argv)
    assert message in capsys.readouterr().err
