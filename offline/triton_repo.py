"""Write a Triton model repository (configs from triton_models/, ONNX files, the runner) for a release."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from ranker.models import ONNX_FILE

TEMPLATES = Path(__file__).resolve().parents[1] / "triton_models"
RUNNER = TEMPLATES / "onnx_runner.py"
CONFIG = "config.pbtxt"
CONFIG_VARIANTS = "configs"
PYTHON_MODEL = "model.py"


def _copy_templates(name: str, model_dir: Path) -> None:
    template = TEMPLATES / name
    if not (template / CONFIG).is_file():
        known = sorted(p.name for p in TEMPLATES.iterdir() if (p / CONFIG).is_file())
        raise ValueError(f"no Triton config template for model {name!r} in {TEMPLATES}; known: {known}")
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(template / CONFIG, model_dir / CONFIG)
    if (template / CONFIG_VARIANTS).is_dir():
        shutil.copytree(template / CONFIG_VARIANTS, model_dir / CONFIG_VARIANTS, dirs_exist_ok=True)


def write_model_repository(
    dst: Path,
    onnx_files: Mapping[str, Path],
    version: int = 1,
    extra_files: Mapping[str, Mapping[str, Path]] | None = None,
) -> None:
    """Lay out dst/<name>/{config.pbtxt, configs/, <version>/model.onnx, <version>/model.py}.

    The version folder holds both the ONNX file (what the GPU config's onnxruntime backend loads)
    and model.py (what the CPU config's python backend loads; it runs the ONNX file its config
    names). `extra_files` adds files to a model's version folder: {model: {file name: source}}.
    """
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    dst = Path(dst)
    for name, onnx_file in onnx_files.items():
        onnx_file = Path(onnx_file)
        if not onnx_file.is_file():
            raise FileNotFoundError(f"ONNX file for model {name!r} does not exist: {onnx_file}")
        model_dir = dst / name
        _copy_templates(name, model_dir)
        version_dir = model_dir / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(onnx_file, version_dir / ONNX_FILE)
        shutil.copy2(RUNNER, version_dir / PYTHON_MODEL)
        for file_name, source in (extra_files or {}).get(name, {}).items():
            shutil.copy2(source, version_dir / file_name)
