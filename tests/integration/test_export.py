"""offline.export end to end on the example catalog: a complete, self-consistent, loadable release."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offline import export
from ranker import release as layout
from ranker.features import FEATURE_NAMES, NUM_FEATURES, TitleIndex
from ranker.models import OnnxEncoder, OnnxScorer, QueryTokenizer

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "examples" / "catalog.csv"
JUDGMENTS = ROOT / "examples" / "judgments.csv"
QUERIES = ["cordless drill", "weed eater", "brushed nickel bathroom faucet", "2x4 pressure treated 8 ft"]


def run_export(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "offline.export", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("releases") / "demo"
    # The pretrained encoder: the tests below compare the ONNX file with it (fine-tuning has its own test).
    done = run_export(
        "--catalog",
        CATALOG,
        "--judgments",
        JUDGMENTS,
        "--out",
        out,
        "--no-finetune",
        "--catalog-log-through",
        "1700000000000-07",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def manifest_of(path: Path) -> dict:
    return json.loads((path / layout.MANIFEST).read_text())


@pytest.mark.slow
def test_manifest_is_what_the_service_reads(released: Path) -> None:
    raw = manifest_of(released)
    manifest = layout.Manifest.from_json(raw)
    assert manifest.features == FEATURE_NAMES
    assert manifest.items == 409
    assert manifest.embedding_dim == 384 and manifest.max_query_tokens == 32
    assert raw["models"]["text_encoder"]["finetuned"] is False
    assert raw["gate"]["decision"] == "first release"
    assert raw["data"]["attributes"]["brand"]["coverage"] > 0.9  # the example catalog gives brands
    assert (released / "policy.toml").is_file() and raw["policy"] == "defaults"
    ranker = raw["models"]["ranker"]
    assert ranker["kind"] == "mlp-listnet"
    assert (ranker["dense_k"], ranker["lexical_k"]) == (400, 400)
    assert raw["data"]["split"]["train_queries"] > raw["data"]["split"]["dev_queries"] > 0
    assert raw["metrics"]["dev"]["dev_ndcg@10"] > 0
    assert manifest.catalog_log_through == "1700000000000-7"  # replicas replay the shared log after it


@pytest.mark.slow
def test_every_file_is_listed_with_its_sha256(released: Path) -> None:
    files = manifest_of(released)["files"]
    on_disk = {p.relative_to(released).as_posix() for p in released.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {layout.MANIFEST}
    for name, digest in files.items():
        assert layout.sha256_file(released / name) == digest, name
    for name in (layout.ITEMS, layout.EMBEDDINGS, layout.DENSE_INDEX, layout.TOKENIZER):
        assert name in files
    for model in ("text_encoder", "ranker"):
        assert f"triton_models/{model}/1/model.onnx" in files
        assert f"triton_models/{model}/config.pbtxt" in files


@pytest.mark.slow
def test_release_loads_and_retrieves(released: Path) -> None:
    loaded = layout.Release.load(released)
    assert len(loaded.catalog) == 409
    tokens = loaded.analyzer.analyze("cordless drill")
    query = OnnxEncoder(released / "triton_models/text_encoder/1/model.onnx").encode_sync(
        *QueryTokenizer(released / layout.TOKENIZER, 32)(["cordless drill"])
    )[0]
    candidates = loaded.retriever.retrieve(tokens, query, dense_k=10, lexical_k=10)
    top = [loaded.catalog.titles[r] for r in candidates.dense_ranked[:3]]
    assert all("Drill" in title for title in top), top
    # The title index is the export's, read from the release, and matches like one built from the titles.
    saved = TitleIndex.load(released / layout.TITLE_INDEX)
    assert saved is not None and saved.vocabulary == loaded.catalog.text.vocabulary
    built = TitleIndex.build(loaded.catalog.titles, loaded.analyzer.analyze_many(loaded.catalog.titles))
    rows = np.arange(len(loaded.catalog))
    for text in ("cordless drill 20v", "1/2 in. x 10 ft. pipe", "paint"):
        terms = loaded.analyzer.analyze(text)
        np.testing.assert_array_equal(saved.matches(rows, text, terms)[0], built.matches(rows, text, terms)[0])


@pytest.mark.slow
def test_onnx_encoder_matches_torch_and_the_index(released: Path) -> None:
    import torch

    from offline.encoder import load_reference

    model, tokenizer = load_reference()
    onnx = OnnxEncoder(released / "triton_models/text_encoder/1/model.onnx")
    ids, mask = QueryTokenizer(released / layout.TOKENIZER, 32)(QUERIES)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(onnx.encode_sync(ids, mask) - expected).max() < 1e-4
    # The stored item vectors are what this ONNX file gives for the titles (serving == index).
    titles = layout.Release.load(released).catalog.titles[:16]
    batch = tokenizer(titles, padding=True, truncation=True, max_length=64, return_tensors="np")
    stored = np.load(released / layout.EMBEDDINGS)[:16]
    assert np.abs(onnx.encode_sync(batch["input_ids"], batch["attention_mask"]) - stored).max() < 1e-4


@pytest.mark.slow
def test_ranker_onnx_scores_feature_rows(released: Path) -> None:
    scores = OnnxScorer(released / "triton_models/ranker/1/model.onnx").score_sync(
        np.random.default_rng(0).random((7, NUM_FEATURES), dtype=np.float32)
    )
    assert scores.shape == (7,) and np.isfinite(scores).all()


@pytest.mark.slow
def test_refuses_to_overwrite_without_force(released: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = manifest_of(released)["release_id"]
    assert export.main(["--catalog", str(CATALOG), "--out", str(released)]) == 2
    assert "--force" in capsys.readouterr().err
    assert manifest_of(released)["release_id"] == before


@pytest.mark.slow
def test_no_staging_folder_left_behind(released: Path) -> None:
    assert [p.name for p in released.parent.iterdir()] == [released.name]


@pytest.mark.slow
def test_fallback_ranker_without_judgments_and_force_replaces(tmp_path: Path) -> None:
    out = tmp_path / "small"
    out.mkdir()
    (out / "stale.txt").write_text("an older release")
    done = run_export("--catalog", CATALOG, "--out", out, "--limit", "40", "--force")
    assert done.returncode == 0, done.stderr[-4000:]
    raw = manifest_of(out)
    assert raw["models"]["ranker"]["kind"] == "fallback-linear"
    assert raw["index"]["items"] == 40 and raw["data"]["split"] is None
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["small"]
    layout.Release.load(out)


def test_publish_replaces_only_with_force(tmp_path: Path) -> None:
    staging, out = tmp_path / ".staging", tmp_path / "out"
    staging.mkdir()
    (staging / "new").write_text("new")
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(export.ExportError, match="--force"):
        export.publish(staging, out, force=False)
    export.publish(staging, out, force=True)
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_replacement_puts_the_old_release_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging, out = tmp_path / ".staging", tmp_path / "out"
    staging.mkdir()
    out.mkdir()
    (out / "old").write_text("old")
    rename = os.rename

    def failing(source: Path, target: Path) -> None:
        if Path(source) == staging:
            raise OSError(5, "Input/output error")
        rename(source, target)

    monkeypatch.setattr(export.os, "rename", failing)
    with pytest.raises(OSError, match="Input/output"):
        export.publish(staging, out, force=True)
    assert [p.name for p in out.iterdir()] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging", "out"]  # export() then removes staging


@pytest.mark.slow
def test_finetune_checkpoints_resumes_and_is_exported(tmp_path: Path) -> None:
    import torch

    from offline.encoder import load_reference

    cache, out = tmp_path / "cache", tmp_path / "releases" / "ft"
    common = ("--catalog", CATALOG, "--judgments", JUDGMENTS, "--out", out, "--cache-dir", cache, "--force")
    tiny = ("--finetune-epochs", "2", "--finetune-batch-size", "16")
    # A budget shorter than one step: training stops at a checkpoint and the partial model is exported.
    first = run_export(*common, *tiny, "--finetune-minutes", "0.001")
    assert first.returncode == 0, first.stderr[-4000:]
    encoder_info = manifest_of(out)["models"]["text_encoder"]
    assert encoder_info["finetuned"] is True
    assert encoder_info["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    training = encoder_info["training"]
    assert (training["complete"], training["steps"]) == (False, 1)
    folder = cache / encoder_info["checkpoint_key"]
    assert (folder / "checkpoint.pt").is_file() and (folder / "model" / "config.json").is_file()
    assert set(encoder_info["dense_dev_metrics"]) == {"pretrained", "finetuned"}

    # The same export again resumes from that checkpoint and finishes; a third run reuses the result.
    second = run_export(*common, *tiny)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming at step 1/" in second.stdout
    training = manifest_of(out)["models"]["text_encoder"]["training"]
    assert training["complete"] is True and training["steps"] == training["total_steps"] > 1
    third = run_export(*common, *tiny)
    assert third.returncode == 0, third.stderr[-4000:]
    assert "already complete" in third.stdout
    assert manifest_of(out)["models"]["text_encoder"]["checkpoint_key"] == encoder_info["checkpoint_key"]

    # The release's ONNX encoder is the fine-tuned model, not the pretrained one.
    ids, mask = QueryTokenizer(out / layout.TOKENIZER, 32)(QUERIES)
    onnx = OnnxEncoder(out / "triton_models/text_encoder/1/model.onnx").encode_sync(ids, mask)
    with torch.no_grad():
        tuned = load_reference(folder / "model")[0](torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        pretrained = load_reference()[0](torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(onnx - tuned).max() < 1e-4
    assert np.abs(onnx - pretrained).max() > 1e-3


@pytest.mark.slow
def test_gate_refuses_a_dev_regression_unless_overridden(released: Path, tmp_path: Path) -> None:
    out = tmp_path / "current"
    shutil.copytree(released, out)
    current = manifest_of(out)
    current["metrics"]["dev"]["dev_ndcg@10"] = 1.0  # a release no retraining can beat
    (out / layout.MANIFEST).write_text(json.dumps(current))
    common = ("--catalog", CATALOG, "--judgments", JUDGMENTS, "--out", out, "--force", "--no-finetune")
    refused = run_export(*common)
    assert refused.returncode != 0 and "refusing to publish" in refused.stderr + refused.stdout
    assert manifest_of(out)["release_id"] == current["release_id"]  # the current release is untouched
    overridden = run_export(*common, "--allow-regression")
    assert overridden.returncode == 0, overridden.stderr[-3000:]
    assert manifest_of(out)["gate"]["decision"] == "overridden"
