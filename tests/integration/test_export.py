"""offline.export end to end on the example catalog: a complete, self-consistent, loadable release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offline import export
from ranker import release as layout
from ranker.features import FEATURE_NAMES, NUM_FEATURES
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
    done = run_export("--catalog", CATALOG, "--judgments", JUDGMENTS, "--out", out)
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
    ranker = raw["models"]["ranker"]
    assert ranker["kind"] == "mlp-listnet"
    assert (ranker["dense_k"], ranker["lexical_k"]) == (400, 400)
    assert raw["data"]["split"]["train_queries"] > raw["data"]["split"]["dev_queries"] > 0
    assert raw["metrics"]["dev"]["dev_ndcg@10"] > 0


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
