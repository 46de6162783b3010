"""Shared test helpers: paths to the shared data (a skip when it is absent), and a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_server import INSTALL_HINT, RedisServer, redis_binary

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HOMEDEPOT = SHARED_DATA / "homedepot"


def require_homedepot() -> Path:
    if not (HOMEDEPOT / "products.csv").is_file():
        pytest.skip(f"Home Depot data not found at {HOMEDEPOT} (expected ../shared/data beside the project)")
    return HOMEDEPOT


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (no persistence) for the session. Missing binary: a failure, not a skip."""
    binary = redis_binary()
    if binary is None:
        pytest.fail(f"redis-server is not installed: {INSTALL_HINT}")
    server = RedisServer(tmp_path_factory.mktemp("redis"), binary)
    server.start()
    yield server.url
    server.stop()
