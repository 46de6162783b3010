"""Loading a release: what its manifest promises must be there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ranker.errors import NotFound
from ranker.release import MANIFEST, Release
from tests.unit import fakes
from tests.unit.test_vector_engine import random_unit, write_release


def test_a_release_missing_a_file_its_manifest_lists_is_not_found(tmp_path: Path) -> None:
    directory = write_release(tmp_path / "release", random_unit(len(fakes.ITEMS), 16))
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"] = {"items.parquet": "sha", "triton_models/text_encoder/1/model.int8.onnx": "sha"}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(NotFound, match=r"lacks files its manifest lists: triton_models/text_encoder/1/model\.int8"):
        Release.load(directory)
    del manifest["files"]["triton_models/text_encoder/1/model.int8.onnx"]
    (directory / MANIFEST).write_text(json.dumps(manifest))
    assert len(Release.load(directory).catalog) == len(fakes.ITEMS)
