"""Loading a release: what its manifest promises must be there, unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from ranker.config import Settings
from ranker.errors import NotFound
from ranker.mapped import mappings
from ranker.release import DENSE_INDEX, LEXICAL_DIR, MANIFEST, Catalog, Release, sha256_file
from ranker.retrieval import Analyzer
from ranker.server import load_release
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


def test_a_release_changed_after_export_is_refused_as_far_as_verify_checks(tmp_path: Path) -> None:
    directory = write_release(tmp_path / "release", random_unit(len(fakes.ITEMS), 16))
    model = directory / "triton_models" / "ranker" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"exported model")
    manifest = json.loads((directory / MANIFEST).read_text())
    names = ["items.parquet", "triton_models/ranker/1/model.onnx"]
    manifest["files"] = {name: sha256_file(directory / name) for name in names}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    for level in ("none", "models", "all"):
        assert len(Release.load(directory, verify=level).catalog) == len(fakes.ITEMS)

    model.write_bytes(b"exported modem")  # one byte flipped, on disk or in transit
    with pytest.raises(NotFound, match=r"changed after export: the sha256 of triton_models/ranker/1/model\.onnx"):
        Release.load(directory)
    Release.load(directory, verify="none")

    model.write_bytes(b"exported model")
    items = pl.read_parquet(directory / "items.parquet")
    items.with_columns(pl.col("price") * 2).write_parquet(directory / "items.parquet")
    Release.load(directory)  # the default checks the models, not the catalog and indexes
    with pytest.raises(NotFound, match=r"the sha256 of items\.parquet differs"):
        Release.load(directory, verify="all")


@pytest.mark.parametrize("mapped", [True, False])
def test_the_service_setting_chooses_mapped_or_copied_index_files(tmp_path: Path, mapped: bool) -> None:
    directory = write_release(tmp_path / "release", random_unit(len(fakes.ITEMS), 16))
    release = load_release(Settings(release_mapped=mapped), directory)
    assert bool(mappings(directory / DENSE_INDEX)) is mapped
    assert bool(mappings(next((directory / LEXICAL_DIR).glob("data*.npy")))) is mapped
    assert len(release.catalog) == len(fakes.ITEMS)


def test_a_category_or_brand_repeated_over_rows_is_one_string_object() -> None:
    frame = pl.DataFrame(
        {"item_id": ["a", "b", "c"], "title": ["Drill", "Saw", "Paint"], "category": ["tools", "tools", None]}
    )
    catalog = Catalog.from_frame(frame, Analyzer())
    assert catalog.categories == ["tools", "tools", None]
    assert catalog.categories[0] is catalog.categories[1]
    assert catalog.rows_with("category", ["tools"]).tolist() == [0, 1]
