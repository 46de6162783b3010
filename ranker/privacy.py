"""How user ids appear outside the profile store: hashed, never in clear."""

from __future__ import annotations

import hashlib


def user_ref(user_id: str) -> str:
    """A stable, non-reversible reference to a user for logs and metrics (16 hex chars of SHA-256)."""
    return "u:" + hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
