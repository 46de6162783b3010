"""Project hygiene a user relies on: light online imports, generated code in sync, settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ranker.config import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_online_import_graph_has_no_torch() -> None:
    code = (
        "import sys, ranker.pipeline, ranker.service, ranker.release, ranker.models;"
        "heavy = sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules);"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_generated_protobuf_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            "protos",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            "protos/ranker/v1/ranker.proto",
        ],
        check=True,
        cwd=ROOT,
    )
    for name in ("ranker_pb2.py", "ranker_pb2_grpc.py", "ranker_pb2.pyi"):
        fresh = (tmp_path / "ranker" / "v1" / name).read_text()
        assert fresh == (ROOT / "ranker" / "v1" / name).read_text(), f"run `make proto`: {name} is stale"


def test_settings_from_env_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKER_PORT", "6000")
    monkeypatch.setenv("RANKER_DENSE_K", "100")
    settings = load_settings(port=7000)
    assert settings.port == 7000 and settings.dense_k == 100


def test_invalid_setting_fails_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKER_DEFAULT_TOP_K", "0")
    with pytest.raises(ValueError, match="default_top_k"):
        load_settings()
    monkeypatch.setenv("RANKER_DEFAULT_TOP_K", "150")
    monkeypatch.setenv("RANKER_MAX_TOP_K", "100")
    with pytest.raises(ValueError, match=r"default_top_k \(150\) must be at most max_top_k \(100\)"):
        load_settings()
    monkeypatch.setenv("RANKER_MAX_TOP_K", "200")
    monkeypatch.setenv("RANKER_MAX_EVENTS_PER_REQUEST", "20000")
    with pytest.raises(ValueError, match=r"max_events_per_request \(20000\) must be at most event_dedup_max_ids"):
        load_settings()
