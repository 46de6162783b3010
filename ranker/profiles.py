"""User profiles: the decayed summary of a shopper's events, the rule that updates it, and the stores that keep it.

A profile holds, for one user, as of its reference time `updated_at`:

- `centroid`: the sum of the embeddings of the items they interacted with (the release's item
  embedding space), each weighted by its event type (ranker.events.TYPE_WEIGHTS) and halved every
  `half_life_s` of age; `weight` is the sum of those weights;
- `categories` / `brands`: the same weights summed per category and per brand (the affinities);
- `recent`: the latest items, newest first, one entry per item, bounded;
- `purchased`: the ids of purchased items, newest first, bounded.

Exponential decay makes the update order-independent: an event older than `updated_at` is added
with its weight already decayed, a newer one decays everything before it. So replays, retries and
out-of-order delivery give the same profile, and idempotence (each event_id applied once) is all
the stores have to guarantee.

Two stores implement ProfileStore: EmbeddedProfileStore (sqlite3 in WAL mode, in process, on local
disk, fsynced before RecordEvents answers) and RedisProfileStore (shared by replicas; keys expire).
Both key users by a SHA-256 of the user id, so neither holds user ids in clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from ranker.errors import BackendFailed, BackendRefused, BackendTimeout, BackendUnavailable
from ranker.events import TYPE_WEIGHTS, Event, EventType

if TYPE_CHECKING:
    from ranker.release import Release

log = logging.getLogger(__name__)

PROFILE_FORMAT = b"RPF1"


@dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    half_life_s: float = 7 * 86400.0
    max_recent: int = 50
    max_purchased: int = 200
    max_affinities: int = 64  # categories and brands kept each (the heaviest)


@dataclass(frozen=True, kw_only=True)
class RecentItem:
    item_id: str
    timestamp: float  # the latest event for the item
    weight: float  # the strongest event type's weight for the item


@dataclass(frozen=True, kw_only=True)
class Profile:
    space: str  # the item-embedding space `centroid` lives in (see ItemSpace.space_id)
    updated_at: float = 0.0  # reference time of the decayed sums
    weight: float = 0.0
    centroid: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    categories: Mapping[str, float] = field(default_factory=dict)
    brands: Mapping[str, float] = field(default_factory=dict)
    recent: tuple[RecentItem, ...] = ()  # newest first
    purchased: tuple[str, ...] = ()  # newest first (by the purchase's own timestamp)
    purchased_at: tuple[float, ...] = ()  # each purchase's latest timestamp, parallel to `purchased`
    events: int = 0  # events applied (searches included)

    @property
    def is_cold(self) -> bool:
        """Nothing to personalise with yet (no item event, or only searches)."""
        return self.weight <= 0.0 or not self.recent

    def to_bytes(self) -> bytes:
        header = json.dumps(
            {
                "space": self.space,
                "updated_at": self.updated_at,
                "weight": self.weight,
                "categories": dict(self.categories),
                "brands": dict(self.brands),
                "recent": [[r.item_id, r.timestamp, r.weight] for r in self.recent],
                "purchased": list(self.purchased),
                "purchased_at": list(self.purchased_at),
                "events": self.events,
            },
            separators=(",", ":"),
        ).encode()
        centroid = np.asarray(self.centroid, dtype="<f4").tobytes()
        return PROFILE_FORMAT + struct.pack(">I", len(header)) + header + centroid

    @classmethod
    def from_bytes(cls, data: bytes) -> Profile:
        if data[:4] != PROFILE_FORMAT:
            raise ValueError(f"not a stored profile (format {data[:4]!r}, expected {PROFILE_FORMAT!r})")
        (size,) = struct.unpack(">I", data[4:8])
        header = json.loads(data[8 : 8 + size])
        return cls(
            space=header["space"],
            updated_at=float(header["updated_at"]),
            weight=float(header["weight"]),
            centroid=np.frombuffer(data[8 + size :], dtype="<f4").astype(np.float32),
            categories={str(k): float(v) for k, v in header["categories"].items()},
            brands={str(k): float(v) for k, v in header["brands"].items()},
            recent=tuple(RecentItem(item_id=i, timestamp=float(t), weight=float(w)) for i, t, w in header["recent"]),
            purchased=tuple(header["purchased"]),
            purchased_at=tuple(float(t) for t in header.get("purchased_at", ())),
            events=int(header["events"]),
        )


@dataclass(frozen=True, kw_only=True)
class ItemSpace:
    """What the profile math reads about items: the serving catalog's rows and embeddings."""

    space_id: str
    live_row: Callable[[str], int | None]  # None for an unknown or deleted item
    embeddings: np.ndarray  # [rows, dim], L2-normalised
    categories: Sequence[str | None]
    brands: Sequence[str | None]
    rows_by_value: Mapping[str, Mapping[str, np.ndarray]]  # "category" / "brand" -> value -> rows

    @classmethod
    def of(cls, release: Release) -> ItemSpace:
        return cls(
            space_id=space_id(release),
            live_row=release.catalog.live_row,
            embeddings=release.retriever.dense.embeddings,
            categories=release.catalog.categories,
            brands=release.catalog.brands,
            rows_by_value=release.catalog.rows_by_value,
        )


def space_id(release: Release) -> str:
    """Releases whose text encoder files are identical share an embedding space (and a centroid)."""
    manifest = release.manifest
    files = manifest.raw.get("files", {})
    encoder = sorted((k, v) for k, v in files.items() if k.startswith(f"triton_models/{manifest.encoder.name}/"))
    basis = json.dumps(encoder) if encoder else manifest.release_id
    return hashlib.sha256(f"{basis}:{manifest.embedding_dim}".encode()).hexdigest()[:16]


def _decay(age_s: float, half_life_s: float) -> float:
    return math.pow(2.0, -max(age_s, 0.0) / half_life_s)


def _heaviest(weights: Mapping[str, float], limit: int) -> dict[str, float]:
    ranked = sorted(weights.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
    return {k: v for k, v in ranked if v > 0.0}


def centroid_of_recent(profile: Profile, items: ItemSpace, config: ProfileConfig) -> np.ndarray:
    """The centroid rebuilt from the recent items alone: for a profile written in another embedding space."""
    total = np.zeros(items.embeddings.shape[1], dtype=np.float64)
    for r in profile.recent:
        row = items.live_row(r.item_id)
        if row is not None:
            total += r.weight * _decay(profile.updated_at - r.timestamp, config.half_life_s) * items.embeddings[row]
    return total.astype(np.float32)


def apply_events(profile: Profile | None, events: Sequence[Event], items: ItemSpace, config: ProfileConfig) -> Profile:
    """The profile with `events` added (each exactly once; the stores see to that). Pure."""
    dim = items.embeddings.shape[1]
    if profile is None:
        profile = Profile(space=items.space_id, centroid=np.zeros(dim, dtype=np.float32))
    elif profile.space != items.space_id or len(profile.centroid) != dim:
        profile = replace(profile, space=items.space_id, centroid=centroid_of_recent(profile, items, config))
    ref = profile.updated_at
    weight = profile.weight
    centroid = profile.centroid.astype(np.float64)
    categories = dict(profile.categories)
    brands = dict(profile.brands)
    recent = {r.item_id: r for r in profile.recent}
    # A profile stored before purchase times were kept has none: its order stands (equal times keep it).
    at = (
        profile.purchased_at if len(profile.purchased_at) == len(profile.purchased) else (ref,) * len(profile.purchased)
    )
    purchased = list(zip(profile.purchased, at, strict=True))  # (item id, latest purchase time), newest first
    applied = 0
    # Sorted so that equal inputs give bit-identical profiles whatever the order they came in.
    for event in sorted(events, key=lambda e: (e.timestamp, e.event_id)):
        applied += 1
        type_weight = TYPE_WEIGHTS[event.type]
        row = items.live_row(event.item_id) if event.item_id else None
        if type_weight <= 0.0 or row is None:
            continue  # a search, or an item deleted since the event was validated
        if event.timestamp > ref:
            factor = _decay(event.timestamp - ref, config.half_life_s)
            weight *= factor
            centroid *= factor
            categories = {k: v * factor for k, v in categories.items()}
            brands = {k: v * factor for k, v in brands.items()}
            ref = event.timestamp
        contribution = type_weight * _decay(ref - event.timestamp, config.half_life_s)
        weight += contribution
        centroid += contribution * items.embeddings[row]
        category, brand = items.categories[row], items.brands[row]
        if category:
            categories[category] = categories.get(category, 0.0) + contribution
        if brand:
            brands[brand] = brands.get(brand, 0.0) + contribution
        seen = recent.get(event.item_id)
        if seen is None or event.timestamp >= seen.timestamp or type_weight > seen.weight:
            recent[event.item_id] = RecentItem(
                item_id=event.item_id,
                timestamp=max(event.timestamp, seen.timestamp if seen else event.timestamp),
                weight=max(type_weight, seen.weight if seen else 0.0),
            )
        if event.type is EventType.PURCHASE:
            before = max((t for i, t in purchased if i == event.item_id), default=event.timestamp)
            purchased = [
                (event.item_id, max(before, event.timestamp)),
                *(p for p in purchased if p[0] != event.item_id),
            ]
    newest = sorted(recent.values(), key=lambda r: (-r.timestamp, r.item_id))[: config.max_recent]
    # A purchase that arrives late takes its place by time, so it cannot push a newer one out of the cap.
    kept = sorted(purchased, key=lambda p: -p[1])[: config.max_purchased]
    return Profile(
        space=items.space_id,
        updated_at=ref,
        weight=weight,
        centroid=centroid.astype(np.float32),
        categories=_heaviest(categories, config.max_affinities),
        brands=_heaviest(brands, config.max_affinities),
        recent=tuple(newest),
        purchased=tuple(i for i, _ in kept),
        purchased_at=tuple(t for _, t in kept),
        events=profile.events + applied,
    )


# -- stores ---------------------------------------------------------------------------------------

ProfileUpdate = Callable[[Profile | None, Sequence[Event]], Profile]


@dataclass(frozen=True)
class RecordCounts:
    applied: int = 0
    duplicates: int = 0

    def __add__(self, other: RecordCounts) -> RecordCounts:
        return RecordCounts(self.applied + other.applied, self.duplicates + other.duplicates)


class ProfileStore(Protocol):
    """Where profiles live. Implementations translate their errors to ranker.errors.BackendError."""

    async def get(self, user_id: str) -> Profile | None:
        """The user's profile, or None when there is none (never stored, expired or forgotten)."""
        ...

    async def record(self, events_by_user: Mapping[str, Sequence[Event]], update: ProfileUpdate) -> RecordCounts:
        """Apply each user's events whose event_id was not applied before, durably, then return.

        Per user, the new profile and the event ids are written atomically: a failure leaves both as
        they were, so the caller can retry the whole batch."""
        ...

    async def forget(self, user_id: str) -> bool:
        """Delete the user's profile and event ids; whether anything was stored."""
        ...

    async def close(self) -> None: ...


def user_key(user_id: str) -> str:
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()


def event_key(event_id: str) -> str:
    return hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _fresh_first(events: Sequence[Event]) -> tuple[list[Event], int]:
    """The events with repeated event ids (within this batch) dropped, and how many were dropped."""
    seen: set[str] = set()
    unique = []
    for e in events:
        if e.event_id not in seen:
            seen.add(e.event_id)
            unique.append(e)
    return unique, len(events) - len(unique)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    user_key TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    user_key TEXT NOT NULL,
    event_key TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (user_key, event_key)
) WITHOUT ROWID;
"""
PURGE_EVERY = 256  # commits between deletions of expired rows


class EmbeddedProfileStore:
    """Profiles in a local sqlite3 file (WAL, synchronous=FULL: a commit is on disk before it returns).

    One process owns the file; calls run in worker threads. Writes take one connection, one at a time;
    reads take another, so Rank never waits behind a RecordEvents commit (WAL: a read sees every commit
    that returned before it). Entries expire `ttl_s` after the user's last event (event ids
    `dedup_ttl_s` after they were recorded)."""

    def __init__(
        self,
        path: Path,
        *,
        ttl_s: float,
        dedup_ttl_s: float,
        durable: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._ttl_s = ttl_s
        self._dedup_ttl_s = dedup_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._commits = 0
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
            self._db.executescript(_SCHEMA)
            self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
        except sqlite3.Error as e:
            raise BackendUnavailable("profile store", f"cannot open {path}: {e}") from e

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise BackendFailed("profile store", f"sqlite: {e}") from e

    async def get(self, user_id: str) -> Profile | None:
        return await asyncio.to_thread(self._get, user_key(user_id))

    def _get(self, key: str) -> Profile | None:
        with self._read_lock:
            try:
                row = self._reader.execute(
                    "SELECT data FROM profiles WHERE user_key = ? AND expires_at >= ?", (key, self._clock())
                ).fetchone()
            except sqlite3.Error as e:
                raise BackendFailed("profile store", f"sqlite: {e}") from e
        return Profile.from_bytes(row[0]) if row else None

    async def record(self, events_by_user: Mapping[str, Sequence[Event]], update: ProfileUpdate) -> RecordCounts:
        if not events_by_user:
            return RecordCounts()
        return await asyncio.to_thread(self._record, events_by_user, update)

    def _record(self, events_by_user: Mapping[str, Sequence[Event]], update: ProfileUpdate) -> RecordCounts:
        counts = RecordCounts()
        now = self._clock()
        with self._transaction() as db:
            for user_id, events in events_by_user.items():
                key = user_key(user_id)
                unique, repeated = _fresh_first(events)
                fresh = []
                for event in unique:
                    # New, or seen so long ago that its dedup entry expired (not yet purged).
                    cursor = db.execute(
                        "INSERT INTO events (user_key, event_key, expires_at) VALUES (?, ?, ?) "
                        "ON CONFLICT (user_key, event_key) DO UPDATE SET expires_at = excluded.expires_at "
                        "WHERE events.expires_at < ?",
                        (key, event_key(event.event_id), now + self._dedup_ttl_s, now),
                    )
                    if cursor.rowcount == 1:
                        fresh.append(event)
                counts += RecordCounts(len(fresh), repeated + len(unique) - len(fresh))
                if not fresh:
                    continue
                row = db.execute(
                    "SELECT data FROM profiles WHERE user_key = ? AND expires_at >= ?", (key, now)
                ).fetchone()
                profile = update(Profile.from_bytes(row[0]) if row else None, fresh)
                db.execute(
                    "INSERT OR REPLACE INTO profiles (user_key, data, expires_at) VALUES (?, ?, ?)",
                    (key, profile.to_bytes(), now + self._ttl_s),
                )
            self._commits += 1
            if self._commits % PURGE_EVERY == 0:
                db.execute("DELETE FROM profiles WHERE expires_at < ?", (now,))
                db.execute("DELETE FROM events WHERE expires_at < ?", (now,))
        return counts

    async def forget(self, user_id: str) -> bool:
        return await asyncio.to_thread(self._forget, user_key(user_id))

    def _forget(self, key: str) -> bool:
        now = self._clock()
        with self._transaction() as db:
            live = db.execute(
                "SELECT (SELECT count(*) FROM profiles WHERE user_key = ? AND expires_at >= ?)"
                " + (SELECT count(*) FROM events WHERE user_key = ? AND expires_at >= ?)",
                (key, now, key, now),
            ).fetchone()[0]
            db.execute("DELETE FROM profiles WHERE user_key = ?", (key,))
            db.execute("DELETE FROM events WHERE user_key = ?", (key,))
        return bool(live)

    async def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()


@dataclass(frozen=True)
class RedisTls:
    """Files for TLS to a rediss:// server (RANKER_REDIS_TLS_*): the CA that verifies it (None: the system's)
    and a client certificate with its key, for a server that requires one."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def connection_options(url: str, password: str | None, tls: RedisTls | None) -> dict[str, Any]:
    """Keyword arguments of redis.Redis.from_url for `url`: the password, and the TLS files when the URL is
    rediss:// (the server's certificate is always verified, its host name included)."""
    options: dict[str, Any] = {} if password is None else {"password": password}
    if url.startswith("rediss://"):
        options["ssl_cert_reqs"] = "required"
        options["ssl_check_hostname"] = True
        if tls is not None:
            files = {"ssl_ca_certs": tls.ca_file, "ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
            options.update({key: str(path) for key, path in files.items() if path is not None})
    return options


@contextlib.contextmanager
def redis_errors_as_backend(password_setting: str = "RANKER_PROFILE_STORE_PASSWORD_FILE") -> Iterator[None]:
    """Redis errors as the service's backend errors (one seam per external system); an authentication
    failure names the setting that holds the password."""
    try:
        yield
    except redis_errors.TimeoutError as e:
        raise BackendTimeout("redis", "no answer in time") from e
    except redis_errors.AuthenticationError as e:
        raise BackendRefused("redis", f"authentication refused ({password_setting}): {e}") from e
    except redis_errors.ConnectionError as e:
        raise BackendUnavailable("redis", f"cannot reach the server: {e}") from e
    except redis_errors.RedisError as e:
        raise BackendFailed("redis", f"{type(e).__name__}: {e}") from e


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value  # the client does not decode responses


class RedisProfileStore:
    """Profiles in Redis, shared by every replica.

    Per user two keys, hash-tagged so they sit in one cluster slot:
      <prefix>:profile:{<sha256(user)>}   the profile (Profile.to_bytes), expiring `ttl_s` after the last event
      <prefix>:events:{<sha256(user)>}    sorted set of applied event ids (hashed), score = when the entry
                                          expires; pruned on every write and capped at `max_event_ids`
    An update is optimistic: WATCH both keys, read, compute the profile in Python (the same code as the
    embedded store), then MULTI/EXEC the profile and the event ids together; a concurrent write to the
    same user aborts the EXEC and the update is retried. ForgetUser deletes both keys."""

    MAX_ATTEMPTS = 20

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        ttl_s: float,
        dedup_ttl_s: float,
        prefix: str = "ranker",
        max_event_ids: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._dedup_ttl_s = dedup_ttl_s
        self._prefix = prefix
        self._max_event_ids = max_event_ids
        self._clock = clock

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        password: str | None = None,
        tls: RedisTls | None = None,
        **kwargs: Any,
    ) -> RedisProfileStore:
        extra = connection_options(url, password, tls)
        client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **extra)
        return cls(client, **kwargs)

    def _keys(self, user_id: str) -> tuple[str, str]:
        tag = "{" + user_key(user_id) + "}"
        return f"{self._prefix}:profile:{tag}", f"{self._prefix}:events:{tag}"

    async def ping(self) -> None:
        with redis_errors_as_backend():
            await self._redis.ping()

    async def get(self, user_id: str) -> Profile | None:
        profile_key, _ = self._keys(user_id)
        with redis_errors_as_backend():
            data = await self._redis.get(profile_key)
        return Profile.from_bytes(_as_bytes(data)) if data else None

    async def record(self, events_by_user: Mapping[str, Sequence[Event]], update: ProfileUpdate) -> RecordCounts:
        results = await asyncio.gather(
            *(self._record_user(user, events, update) for user, events in events_by_user.items()),
            return_exceptions=True,
        )
        counts = RecordCounts()
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the others are committed; a retry of the batch counts them as duplicates
            counts += result
        return counts

    async def _record_user(self, user_id: str, events: Sequence[Event], update: ProfileUpdate) -> RecordCounts:
        profile_key, events_key = self._keys(user_id)
        unique, repeated = _fresh_first(events)
        members = [event_key(e.event_id) for e in unique]
        with redis_errors_as_backend():
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(self.MAX_ATTEMPTS):
                    try:
                        await pipe.watch(profile_key, events_key)
                        now = self._clock()
                        expiries = await pipe.zmscore(events_key, members)
                        fresh = [
                            (e, m)
                            for e, m, expiry in zip(unique, members, expiries, strict=True)
                            if expiry is None or expiry < now
                        ]
                        if not fresh:
                            await pipe.reset()
                            return RecordCounts(0, len(events))
                        data = await pipe.get(profile_key)
                        profile = update(Profile.from_bytes(_as_bytes(data)) if data else None, [e for e, _ in fresh])
                        pipe.multi()
                        pipe.set(profile_key, profile.to_bytes(), px=self._ttl_ms)
                        pipe.zremrangebyscore(events_key, "-inf", now)
                        pipe.zadd(events_key, {m: now + self._dedup_ttl_s for _, m in fresh})
                        pipe.zremrangebyrank(events_key, 0, -(self._max_event_ids + 1))
                        pipe.pexpire(events_key, max(1, int(self._dedup_ttl_s * 1000)))
                        await pipe.execute()
                        return RecordCounts(len(fresh), repeated + len(unique) - len(fresh))
                    except redis_errors.WatchError:
                        continue  # another writer changed this user meanwhile: read again
        raise BackendFailed("redis", f"profile update conflicted {self.MAX_ATTEMPTS} times in a row")

    async def forget(self, user_id: str) -> bool:
        with redis_errors_as_backend():
            return bool(await self._redis.delete(*self._keys(user_id)))

    async def close(self) -> None:
        with contextlib.suppress(redis_errors.RedisError, OSError):
            await self._redis.aclose()


def open_store(
    location: str,
    *,
    state_dir: Path,
    ttl_s: float,
    dedup_ttl_s: float,
    timeout_s: float,
    max_event_ids: int = 10_000,
    password: str | None = None,
    tls: RedisTls | None = None,
) -> EmbeddedProfileStore | RedisProfileStore:
    """The store a RANKER_PROFILE_STORE value names: "embedded" (a file in state_dir) or a redis:// URL
    (`password`, when given, replaces any password in the URL)."""
    if location == "embedded":
        if password is not None:
            raise ValueError("a profile store password needs a Redis profile store, not 'embedded'")
        return EmbeddedProfileStore(
            state_dir.expanduser() / "profiles" / "profiles.sqlite3", ttl_s=ttl_s, dedup_ttl_s=dedup_ttl_s
        )
    if location.startswith(("redis://", "rediss://", "unix://")):
        return RedisProfileStore.from_url(
            location,
            timeout_s=timeout_s,
            password=password,
            tls=tls,
            ttl_s=ttl_s,
            dedup_ttl_s=dedup_ttl_s,
            max_event_ids=max_event_ids,
        )
    raise ValueError(f"profile store must be 'embedded' or a redis:// URL, got {redacted(location)!r}")


def redacted(url: str) -> str:
    """`url` with any password in it replaced by ***, for logs and errors."""
    return re.sub(r"^([a-z]+://[^:@/]*):[^@/]*@", r"\1:***@", url)
