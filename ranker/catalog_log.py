"""The catalog change log shared by every replica: one Redis stream that each ranker appends to and tails.

With RANKER_CATALOG_STORE set to a Redis URL, UpsertItems and DeleteItems append their change to the
stream `<prefix>:catalog:log` instead of the replica's own journal file, and every replica applies the
stream's entries in stream order (ranker.live_catalog). One entry per change:

    change   the change as a self-checking record (ranker.catalog_journal.encode_change), with the
             embeddings of an upsert
    encoder  fingerprint of the text encoder that computed them (ranker.live_catalog.encoder_fingerprint)
    dim      their dimension

A replica serving a release with another text encoder embeds such an entry's titles again.

Compaction (`compact`) replaces the whole log by its net effect: each item's last upsert, with the
encoder that embedded it, and the ids whose last change is a delete. They are appended as new entries
that also carry

    through  the id of the last entry they replace

with copies of the entries appended while the fold was computed, and everything before them is
trimmed, in one MULTI/EXEC that WATCH aborts (and the compaction retries) when another append comes
in between. A replica that has applied `through` skips those entries; one behind it (starting, or cut
off for a while and now missing trimmed entries) applies them, which brings it to the state at
`through`: every record states an item's whole final state. The ranker compacts once the log has
doubled since its last compaction (ranker.live_catalog); the log holds about 2.3 kB per upserted
MiniLM item record.

Durability is Redis's. When the server persists to its append-only file and knows WAITAOF (Redis >= 7.2),
an append returns only once the entry is fsynced, as the journal file's append does; otherwise a Redis
crash can lose the last second of acknowledged changes, and `durable` is False (logged at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
from redis import asyncio as aioredis
from redis import exceptions as redis_errors

from ranker.catalog_journal import Change, Delete, JournalError, Upsert, decode_change, encode_change, entries, fold
from ranker.domain import CatalogItem
from ranker.errors import BackendFailed
from ranker.profiles import RedisTls, connection_options, redis_errors_as_backend

log = logging.getLogger(__name__)
T = TypeVar("T")

FIRST = "0-0"  # the id before every entry
PAGE = 256  # entries per read
WAITAOF_TIMEOUT_MS = 2000
STORE_SETTING = "RANKER_CATALOG_STORE_PASSWORD_FILE"
COMPACT_CHUNK = 64  # item records per entry that a compaction writes
COMPACT_ATTEMPTS = 5  # swaps tried before a compaction gives up because appends keep coming in between


@dataclass(frozen=True)
class LogEntry:
    id: str  # the stream id, "<milliseconds>-<sequence>": entries are applied in this order
    change: Change
    encoder: str  # fingerprint of the text encoder that computed an upsert's embeddings
    through: str | None = None  # written by a compaction: the last entry id it replaces


@dataclass(frozen=True, kw_only=True)
class Compaction:
    through: str  # the last entry replaced
    entries_before: int
    entries_after: int
    records_before: int  # item records (catalog_journal.entries)
    records_after: int


def fold_entries(
    log: Sequence[LogEntry],
) -> tuple[list[tuple[CatalogItem, np.ndarray]], list[str], dict[str, str]]:
    """catalog_journal.fold() of the entries' changes, and the encoder of each upserted item's last upsert."""
    upserts, deletes = fold(_yielding(entry.change) for entry in log)
    encoders = {
        item.item_id: entry.encoder for entry in log if isinstance(entry.change, Upsert) for item in entry.change.items
    }
    return upserts, deletes, encoders


def compacted(log: Sequence[LogEntry]) -> list[tuple[Change, str, int]]:
    """The net effect of the entries as (change, encoder, dim) to append: the ids whose last change is a
    delete, then each item's last upsert, grouped by the encoder that embedded it, COMPACT_CHUNK per change."""
    upserts, deletes, encoders = fold_entries(log)
    out: list[tuple[Change, str, int]] = [
        (Delete(tuple(deletes[i : i + COMPACT_CHUNK])), "", 0) for i in range(0, len(deletes), COMPACT_CHUNK)
    ]
    by_encoder: dict[str, list[int]] = {}
    for i, (item, _) in enumerate(upserts):
        by_encoder.setdefault(encoders[item.item_id], []).append(i)
    for encoder, rows in by_encoder.items():
        for start in range(0, len(rows), COMPACT_CHUNK):
            chunk = [upserts[i] for i in rows[start : start + COMPACT_CHUNK]]
            vectors = np.stack([vector for _, vector in chunk]).astype(np.float32)
            out.append((Upsert(tuple(item for item, _ in chunk), vectors), encoder, int(vectors.shape[1])))
    return out


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

    async def compact(self) -> Compaction | None:
        """Replace every entry by `compacted(entries)`, with `through` set, in one step (entries appended while it
        ran are copied after them); None when the log is empty, or appends kept landing between its read and its
        swap (COMPACT_ATTEMPTS times): the log is then left as it was."""
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
        through = _text(fields["through"]) if "through" in fields else None
        if through is not None:
            entry_order(through)
    except (KeyError, ValueError, TypeError, JournalError) as e:
        raise BackendFailed("catalog log", f"entry {identifier} is damaged: {e}") from e
    return LogEntry(identifier, change, encoder, through)


def _entries(page: Sequence[tuple[bytes | str, dict[Any, Any]]]) -> list[LogEntry]:
    return [_yielding(_entry(entry_id, fields)) for entry_id, fields in page]


def _yielding(value: T) -> T:
    """`value`, after offering the GIL to other threads: while a worker thread decodes or encodes a log, the event
    loop waits for it at most one entry long, not a whole switch interval (5 ms)."""
    time.sleep(0)
    return value


def _fields(change: Change, encoder: str, dim: int) -> dict[str, bytes | str]:
    return {"change": encode_change(change), "encoder": encoder, "dim": str(dim)}


def _encoded(changes: Sequence[tuple[Change, str, int]]) -> list[dict[str, bytes | str]]:
    return [_yielding(_fields(change, encoder, dim)) for change, encoder, dim in changes]


def embedding_dim(change: Change) -> int:
    """The dimension of an upsert's embeddings (the `dim` field of its entry); 0 for a delete."""
    return int(change.embeddings.shape[1]) if isinstance(change, Upsert) else 0


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
        with _errors():
            entry_id = _text(await self._redis.xadd(self.key, _fields(change, encoder, dim)))  # type: ignore[arg-type]
            await self._persisted(f"entry {entry_id}")
        return entry_id

    async def _persisted(self, what: str) -> None:
        if self.durable:
            local, _ = await self._redis.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)
            if int(local) < 1:  # in Redis but not on its disk: the caller is told, and may retry (idempotent)
                raise BackendFailed("catalog log", f"{what} was not persisted within {WAITAOF_TIMEOUT_MS} ms")

    async def compact(self) -> Compaction | None:
        # The whole log is read, folded and encoded first, with nobody waiting. Then, under WATCH, only what
        # was appended meanwhile is read and copied after the folded entries, and MULTI/EXEC swaps them in.
        with _errors():
            log = await self.read(FIRST)
            if not log:
                return None
            folded = await asyncio.to_thread(compacted, log)
            block = await asyncio.to_thread(_encoded, folded)
            for _ in range(COMPACT_ATTEMPTS):
                async with self._redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(self.key)  # EXEC fails if anything touches the stream from here on
                    last: Any = await pipe.xrevrange(self.key, count=1)
                    if not last:  # the stream was deleted meanwhile
                        return None
                    through = _text(last[0][0])
                    since = await self.read(log[-1].id, until=through)  # on another connection; WATCH is the pipe's
                    appended = [_fields(e.change, e.encoder, embedding_dim(e.change)) for e in since]
                    pipe.multi()
                    for fields in block + appended:
                        pipe.xadd(self.key, fields | {"through": through})  # type: ignore[arg-type]
                    pipe.xtrim(self.key, maxlen=len(block) + len(appended), approximate=False)  # only those remain
                    try:
                        await pipe.execute()
                    except redis_errors.WatchError:
                        continue
                await self._persisted(f"the compaction through {through}")
                return Compaction(
                    through=through,
                    entries_before=len(log) + len(since),
                    entries_after=len(block) + len(appended),
                    records_before=entries(e.change for e in log + since),
                    records_after=entries(change for change, _, _ in folded) + entries(e.change for e in since),
                )
            return None

    async def read(self, since: str, *, until: str | None = None) -> list[LogEntry]:
        found: list[LogEntry] = []
        start = f"({since}"
        with _errors():
            while True:
                page: Any = await self._redis.xrange(self.key, min=start, max=until or "+", count=PAGE)
                # Decoded on a worker thread: a replay or a compaction reads thousands of entries while serving.
                found.extend(await asyncio.to_thread(_entries, page))
                if len(page) < PAGE:
                    return found
                start = f"({found[-1].id}"

    async def wait(self, since: str, *, block_s: float) -> list[LogEntry]:
        with _errors():
            answer: Any = await self._tail.xread({self.key: since}, count=PAGE, block=max(1, int(block_s * 1000)))
        page = [entry for _, entries_read in answer or () for entry in entries_read]
        # On a worker thread, as read() does: a compaction's entries hold every changed item (megabytes of JSON).
        return await asyncio.to_thread(_entries, page) if page else []

    async def length(self) -> int:
        with _errors():
            return int(await self._redis.xlen(self.key))

    async def position(self) -> str:
        """The id of the last entry ever appended (FIRST for a log that does not exist yet): a release exported
        from a catalog taken after this point includes every change up to it (offline.export --catalog-log-through)."""
        with _errors():
            try:
                info: Any = await self._redis.xinfo_stream(self.key)
            except redis_errors.ResponseError:  # no such key
                return FIRST
        return _text(info["last-generated-id"])

    async def close(self) -> None:
        for client in (self._redis, self._tail):
            with contextlib.suppress(redis_errors.RedisError, OSError):
                await client.aclose()
