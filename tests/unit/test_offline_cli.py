"""The offline commands refuse bad arguments before any work, and report user errors without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline import evaluate, export, train_encoder


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("item_id,title\na,cordless drill\n")
    judgments = tmp_path / "judgments.csv"
    judgments.write_text("query,item_id,relevance\ndrill,a,3\n")
    return {"catalog": str(catalog), "judgments": str(judgments), "dir": str(tmp_path)}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dense-k", "-5"], "--dense-k: must be an integer ≥ 1, got -5"),
        (["--limit", "-1"], "--limit: must be an integer ≥ 0, got -1"),
        (["--diversity-strength", "7"], "--diversity-strength: must be a number in 0..1, got '7'"),
        (["--strengths", "0.1,nan"], "--strengths: must be a finite number, got 'nan'"),
        (["--ef-search", "many"], "--ef-search: must be an integer ≥ 1, got 'many'"),
    ],
)
def test_evaluate_refuses_out_of_range_numbers(
    files: dict[str, str], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--release", files["dir"], "--products", files["catalog"], "--judgments", files["judgments"], *extra]
    with pytest.raises(SystemExit) as exit_:
        evaluate.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_names_a_missing_file_and_a_folder_that_is_not_a_release(
    files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--release", files["dir"], "--products", "nope.csv", "--judgments", files["judgments"]])
    assert "--products: no such file: nope.csv" in capsys.readouterr().err
    argv = ["--release", files["dir"], "--products", files["catalog"], "--judgments", files["judgments"], "--quiet"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "manifest.json" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--finetune-epochs", "0"], "--finetune-epochs: must be an integer ≥ 1, got 0"),
        (["--finetune-batch-size", "0"], "--finetune-batch-size: must be an integer ≥ 1, got 0"),
        (["--finetune-minutes", "-1"], "--finetune-minutes: must be a number > 0, got '-1'"),
        (["--interactions", "missing.csv"], "--interactions: no such file: missing.csv"),
        (["--limit", "0"], "--limit: must be an integer ≥ 1, got 0"),
        (["--catalog-log-through", "latest"], "expected a stream id like 1700000000000-0, got 'latest'"),
    ],
)
def test_export_refuses_bad_arguments_before_training(
    files: dict[str, str], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        export.parse_args(["--catalog", files["catalog"], "--out", f"{files['dir']}/r", *extra])
    assert message in capsys.readouterr().err


def test_export_refuses_a_bad_policy_before_training(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    policy = Path(files["dir"]) / "policy.toml"
    policy.write_text('[signals.ranker]\nweight = "heavy"\n')
    out = Path(files["dir"]) / "r"
    argv = ["--catalog", files["catalog"], "--judgments", files["judgments"], "--out", str(out)]
    argv += ["--policy", str(policy)]
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "policy.toml" in err and "weight" in err
    assert not out.exists()


def test_train_encoder_refuses_bad_numbers(files: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_encoder.parse_args(
            ["--catalog", files["catalog"], "--judgments", files["judgments"], "--out", "x", "--epochs", "0"]
        )
    assert "--epochs: must be an integer ≥ 1, got 0" in capsys.readouterr().err
