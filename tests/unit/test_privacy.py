"""User references in logs: keyed, so a guessed id cannot be checked against them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ranker import privacy


@pytest.fixture(autouse=True)
def keep_key() -> Iterator[None]:
    key = privacy._key
    yield
    privacy._key = key


def test_a_reference_is_stable_under_one_key_and_not_a_plain_hash(tmp_path: Path) -> None:
    ref = privacy.user_ref("alice@example.com")
    assert ref == privacy.user_ref("alice@example.com") != privacy.user_ref("bob@example.com")
    plain = hashlib.sha256(b"alice@example.com").hexdigest()[:16]
    assert ref.startswith("u:") and len(ref) == 18 and plain not in ref


def test_replicas_sharing_a_key_file_agree(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("correct horse battery staple\n")
    privacy.use_key_file(key)
    first = privacy.user_ref("alice@example.com")
    privacy._key = b"another process's random key"
    assert privacy.user_ref("alice@example.com") != first
    privacy.use_key_file(key)
    assert privacy.user_ref("alice@example.com") == first


def test_a_short_or_missing_key_file_stops_the_start(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("tiny\n")
    with pytest.raises(SystemExit, match="at least 16 bytes, got 4"):
        privacy.use_key_file(short)
    with pytest.raises(SystemExit, match="user_ref_key_file"):
        privacy.use_key_file(tmp_path / "missing")
