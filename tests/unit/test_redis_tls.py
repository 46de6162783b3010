"""TLS to Redis (rediss:// stores, RANKER_REDIS_TLS_*): both stores against a real redis-server that speaks TLS
only and requires a client certificate; what is not trusted is refused."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ranker.catalog_journal import Upsert
from ranker.catalog_log import FIRST, RedisCatalogLog
from ranker.config import Settings
from ranker.domain import CatalogItem
from ranker.errors import BackendError
from ranker.profiles import RedisProfileStore, RedisTls
from tests.certs import Pki, make_pki
from tests.redis_server import INSTALL_HINT, RedisServer, redis_binary
from tests.redis_server import RedisTls as ServerTls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_url(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = redis_binary()
    if binary is None:
        pytest.fail(f"redis-server is not installed: {INSTALL_HINT}")
    tls = ServerTls(
        cert=pki.server_cert,
        key=pki.server_key,
        ca=pki.ca,
        auth_clients=True,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
    )
    server = RedisServer(tmp_path_factory.mktemp("redis-tls"), binary, tls=tls)
    server.start()
    yield server.url
    server.stop()


def client_tls(pki: Pki) -> RedisTls:
    return RedisTls(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)


def test_both_stores_work_over_tls_with_a_client_certificate(tls_url: str, pki: Pki) -> None:
    assert tls_url.startswith("rediss://")

    async def scenario() -> None:
        profiles = RedisProfileStore.from_url(tls_url, timeout_s=2.0, tls=client_tls(pki), ttl_s=60, dedup_ttl_s=60)
        await profiles.ping()
        assert await profiles.get("someone") is None
        await profiles.close()
        log = RedisCatalogLog.from_url(tls_url, timeout_s=2.0, block_s=0.2, tls=client_tls(pki), prefix="tls")
        await log.check()
        item = CatalogItem(item_id="x1", title="Werner step ladder")
        entry_id = await log.append(Upsert((item,), np.ones((1, 4), np.float32)), encoder="e", dim=4)
        assert [e.id for e in await log.read(FIRST)] == [entry_id]
        assert await log.wait(entry_id, block_s=0.2) == []  # the blocking read's own connection, over TLS too
        await log.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "why", ["no client certificate", "a client certificate of another CA", "server not verified", "plain TCP"]
)
def test_what_the_server_or_the_client_does_not_trust_is_refused(tls_url: str, pki: Pki, why: str) -> None:
    url, tls = tls_url, client_tls(pki)
    if why == "no client certificate":
        tls = RedisTls(ca_file=pki.ca)
    elif why == "a client certificate of another CA":
        tls = RedisTls(ca_file=pki.ca, cert_file=pki.rogue_cert, key_file=pki.rogue_key)
    elif why == "server not verified":  # the system's CAs do not know the test CA
        tls = RedisTls(cert_file=pki.client_cert, key_file=pki.client_key)
    else:
        url = tls_url.replace("rediss://", "redis://")

    async def scenario() -> None:
        store = RedisProfileStore.from_url(url, timeout_s=1.0, tls=tls, ttl_s=60, dedup_ttl_s=60)
        log = RedisCatalogLog.from_url(url, timeout_s=1.0, block_s=0.2, tls=tls, prefix="tls")
        with pytest.raises(BackendError):
            await store.ping()
        with pytest.raises(BackendError):
            await log.check()
        await store.close()
        await log.close()

    asyncio.run(scenario())


def test_tls_settings_need_a_rediss_store_and_a_key_with_the_certificate(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="rediss://"):
        Settings(redis_tls_ca_file=pki.ca)
    with pytest.raises(ValidationError, match="set together"):
        Settings(profile_store="rediss://redis:6380/0", redis_tls_cert_file=pki.client_cert)
    settings = Settings(
        catalog_store="rediss://redis:6380/0",
        redis_tls_ca_file=pki.ca,
        redis_tls_cert_file=pki.client_cert,
        redis_tls_key_file=pki.client_key,
    )
    assert settings.redis_tls_ca_file == pki.ca
