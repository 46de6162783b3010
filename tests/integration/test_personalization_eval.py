"""`python -m offline.evaluate personalization` on the shared Amazon Scientific data (a few hundred users)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from offline.personalization import parse_text
from tests.conftest import ROOT, SHARED_DATA

pytestmark = [pytest.mark.slow, pytest.mark.data]
AMAZON = SHARED_DATA / "amazon_scientific"


def test_item_text_is_title_category_path_and_brand() -> None:
    text = "DEWALT DW4524 4-1/2-Inch Wheel. Industrial & Scientific Abrasive Wheels & Discs. DEWALT. "
    assert parse_text(text) == (
        "DEWALT DW4524 4-1/2-Inch Wheel",
        "Industrial & Scientific Abrasive Wheels & Discs",
        "DEWALT",
    )
    assert parse_text("Glue. 8 oz. Industrial & Scientific Adhesives. Gorilla. ")[0] == "Glue. 8 oz"
    assert parse_text("no structure") == ("no structure", None, None)


def test_personalised_recommendations_beat_popularity() -> None:
    if not (AMAZON / "Scientific.text").is_file():
        pytest.skip(f"Amazon Scientific data not found at {AMAZON} (expected ../shared/data beside the project)")
    command = [sys.executable, "-m", "offline.evaluate", "personalization", "--data", str(AMAZON),
               "--split", "holdout", "--limit", "300", "--ablation", "--json", "--quiet"]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["items"] == 4385 and result["personalized"]["users"] == 300
    assert result["personalized"]["ndcg@10"] > 2 * result["popularity"]["ndcg@10"]
    assert result["ablation_agrees_with_pipeline"] == 1.0  # the direct scoring is the pipeline's order
    variants = {row["variant"] for row in result["ablation"]}
    assert {"default", "neighbours only", "centroid only", "default without neighbours"} <= variants
