"""ranker.mapped: finding this process's mappings of a file and faulting their pages in."""

from __future__ import annotations

import mmap
import os
import resource
import sys
from pathlib import Path

import pytest

from ranker.mapped import mappings, populate

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _resident(start: int) -> int:
    """Bytes of the mapping at `start` in this process's page tables (the Rss of its /proc/self/smaps entry)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"{start:x}-"))
    rss = next(line for line in lines[head + 1 :] if line.startswith("Rss:"))
    return int(rss.split()[1]) * 1024


def test_a_mapped_file_is_found_and_populated(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    size = 64 * resource.getpagesize()
    path.write_bytes(os.urandom(size))
    assert mappings(path) == [] and populate(path) == 0  # not mapped: nothing to do, no error
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as region:
        found = mappings(path)
        assert len(found) == 1 and found[0][1] - found[0][0] == size
        assert mappings(tmp_path / "other.bin") == []
        assert _resident(found[0][0]) == 0  # nothing read through the mapping yet
        assert populate(path) == size
        assert _resident(found[0][0]) == size
        assert region[:4] == path.read_bytes()[:4]


def test_a_missing_file_has_no_mappings(tmp_path: Path) -> None:
    assert mappings(tmp_path / "missing") == []
