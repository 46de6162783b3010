"""How user ids appear outside the profile store: as keyed hashes, never in clear.

A plain hash of a guessable id (an email, a customer number) is reversed by hashing guesses, so the
reference is an HMAC under a secret key: RANKER_USER_REF_KEY_FILE, shared by the replicas so that a
user's lines correlate across them. Without one, each process draws its own key at start.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

MIN_KEY_BYTES = 16
_key = secrets.token_bytes(32)


def user_ref(user_id: str) -> str:
    """A stable (per key), non-reversible reference to a user for logs and metrics: 16 hex chars of HMAC-SHA256."""
    digest = hmac.new(_key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return "u:" + digest[:16]


def use_key_file(path: Path) -> None:
    """Key user references with the file's bytes (surrounding whitespace dropped); SystemExit when unusable."""
    global _key
    try:
        key = path.read_bytes().strip()
    except OSError as e:
        raise SystemExit(f"user_ref_key_file {path}: {e.strerror or type(e).__name__}") from None
    if len(key) < MIN_KEY_BYTES:
        raise SystemExit(f"user_ref_key_file {path}: the key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    _key = key
