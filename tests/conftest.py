"""Shared test helpers: paths to the shared data, and a skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HOMEDEPOT = SHARED_DATA / "homedepot"


def require_homedepot() -> Path:
    if not (HOMEDEPOT / "products.csv").is_file():
        pytest.skip(f"Home Depot data not found at {HOMEDEPOT} (expected ../shared/data beside the project)")
    return HOMEDEPOT
