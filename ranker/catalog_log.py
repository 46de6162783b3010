"""The catalog change log shared by every replica: one Redis stream that each ranker appends to and tails.

With RANKER_CATALOG_STORE set to a Redis URL, UpsertItems and DeleteItems append their change to the
stream `<prefix>:catalog:log` instead of the replica's own journal file, and every replica applies the
stream's entries in stream order (ranker.live_catalog). One entry per change:

    change   the change as a self-checking record (ranker.catalog_journal.encode_change), with the
             embeddings of an upsert
    encoder  fingerprint of the text encoder that computed them (ranker.live_catalog.encoder_fingerprint)
    dim      their dimension

A replica serving a release with another text encoder embeds such an entry's titles again. Entries are
never trimmed (a compaction into a new release is not built), so the log holds every change since it
was created: about 2.3 kB per upserted MiniLM item.

Durability is Redis's. When the server persists to its append-only file and knows WAITAOF (Redis >= 7.2),
an append returns only once the entry is fsynced, as the journal file's append does; otherwise a Redis
crash can lose the last second of acknowledged changes, and `durable` is False (logged at start).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from redis import asyncio as aioredis
from redis import exceptions as redis_errors

from ranker.catalog_journal import Change, JournalError, decode_change, encode_change
from ranker.errors import BackendFailed
from ranker.profiles import RedisTls, connection_options, redis_errors_as_backend

log = logging.getLogger(__name__)

FIRST = "0-0"  # the id before every entry
PAGE = 256  # entries per read
WAITAOF_TIMEOUT_MS = 2000
STORE_SETTING = "RANKER_CATALOG_STORE_PASSWORD_FILE"


@dataclass(frozen=True)
class LogEntry:
    id: str  # the stream id, "<milliseconds>-<sequence>": entries are applied in this order
    change: Change
    encoder: str  # fingerprint of the text encoder that computed an upsert's embeddings


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def after(entry_id: str, than: str) -> bool:
    return entry_order(entry_id) > entry_order(than)


class CatalogLog(Protocol):
    """An ordered log of catalog changes shared by replicas (RedisCatalogLog; a list in unit tests)."""

    async def append(self, change: Change, *, encoder: str, dim: int) -> str:
        """Append the change; returns its id, greater than every id before it. BackendError when it fails."""
        ...

    async def read(self, since: str, *, until: str | None = None) -> list[LogEntry]:
        """Every entry after `since` (exclusive) up to `until` (inclusive; None: the end), in order."""
        ...

    async def wait(self, since: str, *, block_s: float) -> list[LogEntry]:
        """Entries after `since`, waiting up to `block_s` for the first; [] when none came."""
        ...

    async def close(self) -> None: ...


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    with redis_errors_as_backend(STORE_SETTING):
        yield


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry(entry_id: bytes | str, fields: dict[Any, Any]) -> LogEntry:
    """One stream entry; BackendFailed when it is damaged (a broken record, or a field missing)."""
    fields = {_text(k): v for k, v in fields.items()}
    identifier = _text(entry_id)
    try:
        dim = int(fields["dim"])
        change = decode_change(bytes(fields["change"]), dim)
        encoder = _text(fields["encoder"])
    except (KeyError, ValueError, TypeError, JournalError) as e:
        raise BackendFailed("catalog log", f"entry {identifier} is damaged: {e}") from e
    return LogEntry(identifier, change, encoder)


class RedisCatalogLog:
    """CatalogLog over a Redis stream. Two connection pools: commands time out after `timeout_s`, the
    blocking read that tails the log waits up to its `block_s` on its own pool."""

    def __init__(self, client: aioredis.Redis, tail: aioredis.Redis, *, key: str) -> None:
        self._redis = client
        self._tail = tail
        self.key = key
        self.durable = False  # set by check(): appends wait for Redis' fsync (WAITAOF)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        block_s: float,
        password: str | None = None,
        tls: RedisTls | None = None,
        prefix: str = "ranker",
    ) -> RedisCatalogLog:
        extra = connection_options(url, password, tls)

        def client(read_timeout: float) -> aioredis.Redis:
            return aioredis.Redis.from_url(url, socket_timeout=read_timeout, socket_connect_timeout=timeout_s, **extra)

        return cls(client(timeout_s), client(block_s + timeout_s), key=f"{prefix}:catalog:log")

    async def check(self) -> None:
        """Reach the server and learn whether appends can wait for its fsync; BackendError when unreachable."""
        with _errors():
            await self._redis.ping()
            try:
                await self._redis.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)
                self.durable = True
            except redis_errors.ResponseError as e:  # Redis < 7.2, or appendonly off
                self.durable = False
                log.warning(
                    "catalog changes are acknowledged before Redis persists them (%s): a Redis crash can lose "
                    "the last second of them; run Redis >= 7.2 with appendonly yes",
                    e,
                )

    async def append(self, change: Change, *, encoder: str, dim: int) -> str:
        fields = {"change": encode_change(change), "encoder": encoder, "dim": str(dim)}
        with _errors():
            entry_id = _text(await self._redis.xadd(self.key, fields))  # type: ignore[arg-type]
            if self.durable:
                local, _ = await self._redis.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)
                if int(local) < 1:  # in Redis but not on its disk: the caller is told, and may retry (idempotent)
                    raise BackendFailed(
                        "catalog log", f"entry {entry_id} was not persisted within {WAITAOF_TIMEOUT_MS} ms"
                    )
        return entry_id

    async def read(self, since: str, *, until: str | None = None) -> list[LogEntry]:
        entries: list[LogEntry] = []
        start = f"({since}"
        with _errors():
            while True:
                page: Any = await self._redis.xrange(self.key, min=start, max=until or "+", count=PAGE)
                entries.extend(_entry(i, fields) for i, fields in page)
                if len(page) < PAGE:
                    return entries
                start = f"({entries[-1].id}"

    async def wait(self, since: str, *, block_s: float) -> list[LogEntry]:
        with _errors():
            answer: Any = await self._tail.xread({self.key: since}, count=PAGE, block=max(1, int(block_s * 1000)))
        return [_entry(i, fields) for _, page in answer or () for i, fields in page]

    async def length(self) -> int:
        with _errors():
            return int(await self._redis.xlen(self.key))

    async def close(self) -> None:
        for client in (self._redis, self._tail):
            with contextlib.suppress(redis_errors.RedisError, OSError):
                await client.aclose()
