"""offline.synthetic grows a release the service loads like any other (the 1M-item benchmark's catalog)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from offline import synthetic
from ranker.release import ITEMS, TITLE_INDEX, Release

pytestmark = pytest.mark.slow  # exports the example release when the session has not yet


def test_a_synthetic_release_loads_with_variants_of_every_item(example_release: Path, tmp_path: Path) -> None:
    base = Release.load(example_release)
    n = len(base.catalog)
    out = tmp_path / "synthetic"
    assert synthetic.main(["--base", str(example_release), "--items", str(3 * n + 5), "--out", str(out)]) == 0

    grown = Release.load(out)
    assert len(grown.catalog) == grown.retriever.dense.num_items == 3 * n + 5
    assert grown.manifest.raw["synthetic"]["base_release"] == base.manifest.release_id
    # Variant 0 is the base item; variant 2 of item 4 is a near-duplicate with its own id and title.
    assert grown.catalog.item_ids[:n] == base.catalog.item_ids
    assert grown.catalog.item_ids[2 * n + 4] == f"{base.catalog.item_ids[4]}~v2"
    assert grown.catalog.titles[2 * n + 4] == f"{base.catalog.titles[4]} {synthetic.SUFFIX} 2"
    e = np.asarray(grown.retriever.dense.embeddings)
    np.testing.assert_allclose(e[:n], np.asarray(base.retriever.dense.embeddings), atol=1e-6)
    cosine = float(e[2 * n + 4] @ e[4])
    assert 0.8 < cosine < 0.99
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert pl.read_parquet(out / ITEMS).height == 3 * n + 5
    assert (out / TITLE_INDEX / "meta.json").is_file()
    # The variant's own embedding finds it first.
    assert grown.retriever.dense.search(e[2 * n + 4], 1)[0] == 2 * n + 4
