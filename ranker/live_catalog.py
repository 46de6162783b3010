"""Online catalog updates for the serving ranker: embed on Triton, journal, build the next snapshot, swap.

UpsertItems embeds the titles with the release's text encoder exactly as offline.export embedded the
catalog (its tokenizer, truncated to the manifest's max_title_tokens, mean-pooled and L2-normalised
by the model), then under one lock: builds the next CatalogSnapshot (ranker.catalog_overlay),
appends the change to the journal and fsyncs it (ranker.catalog_journal), and swaps the serving
Ranker for one over the new snapshot. A Rank takes the serving Ranker once, so it sees a whole batch
or none of it. Nothing is applied when the encoder fails (UNAVAILABLE) or the journal cannot be
written. A call that fails after that point (its deadline passed while the change was being
written) may have been applied: retrying is safe, an upsert or delete is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Protocol

import numpy as np

from ranker import observability
from ranker.catalog_journal import (
    JOURNAL,
    CatalogJournal,
    Change,
    Delete,
    JournalError,
    JournalHeader,
    Upsert,
    entries,
    fold,
    read,
)
from ranker.catalog_log import FIRST, CatalogLog, LogEntry, after, entry_order, fold_entries
from ranker.catalog_overlay import Applied, CatalogSnapshot
from ranker.domain import CatalogItem
from ranker.errors import BackendError, BackendFailed, BackendTimeout, BackendUnavailable, NotConfigured
from ranker.models import CachedEncoder, Encoder, QueryTokenizer
from ranker.pipeline import Ranker
from ranker.release import ENCODER_MODEL, TOKENIZER, Manifest, Release
from ranker.retrieval import Analyzer

log = logging.getLogger(__name__)

# Titles per encoder call (the text_encoder takes up to 64): the encoder's queue is shared with Rank's
# query encodes, which wait behind at most one batch. On 2 CPU cores, 16 instead of 64 cut Rank's p90
# during 100-item upserts from ~700 ms to ~190 ms and made the upserts faster too (docs/catalog-updates.md).
ENCODE_BATCH = 16
DEFAULT_MAX_TITLE_TOKENS = 64  # offline.encoder.MAX_TITLE_TOKENS, for manifests that do not record it
JOURNAL_DIR = "catalog"
COMPACT_MIN_ENTRIES = 1000  # at start, rewrite a journal this long when most of it is superseded; and
# compact the shared log once it holds this many item records and has doubled since its last compaction
BACKEND = f"triton:{ENCODER_MODEL}"
FOLLOW_BLOCK_S = 1.0  # a shared log's tail waits this long per read for new entries
FOLLOW_RETRY_S = 1.0  # after a failed read or apply, the tail tries again this much later


class CatalogRetired(BackendUnavailable):
    """This live catalog was replaced by another release's (a release swap); the change was not applied here."""

    def __init__(self, reason: str) -> None:
        super().__init__("catalog", reason)


class CatalogUpdates(Protocol):
    """What the UpsertItems / DeleteItems RPCs need: a LiveCatalog, or ranker.swap's view of the serving one."""

    async def upsert(self, items: Sequence[CatalogItem], *, timeout: float | None) -> Applied: ...

    async def delete(self, item_ids: Sequence[str]) -> Applied: ...


class TextTokenizer(Protocol):
    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Padded token ids and attention mask, [len(texts), tokens] each."""
        ...


def item_tokenizer(release: Release) -> QueryTokenizer:
    """The tokenizer the export embedded titles with: the release's, truncated at max_title_tokens."""
    max_tokens = int(release.manifest.encoder.extra.get("max_title_tokens", DEFAULT_MAX_TITLE_TOKENS))
    return QueryTokenizer(release.path / TOKENIZER, max_tokens)


def encoder_fingerprint(manifest: Manifest) -> str:
    """What determines an item's embedding: the encoder's ONNX file, the tokenizer and the truncation.

    Two releases with the same fingerprint embed a title identically, so journal embeddings carry over."""
    files = manifest.raw.get("files", {})
    model_dir = f"triton_models/{ENCODER_MODEL}/"
    parts = {k: v for k, v in files.items() if k == TOKENIZER or (k.startswith(model_dir) and k.endswith(".onnx"))}
    if not parts:  # a manifest without checksums: only the same release is known to match
        parts = {"release_id": manifest.release_id}
    parts["max_title_tokens"] = str(manifest.encoder.extra.get("max_title_tokens", DEFAULT_MAX_TITLE_TOKENS))
    parts["dim"] = str(manifest.embedding_dim)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


async def embed_titles(
    encoder: Encoder,
    tokenizer: TextTokenizer,
    titles: Sequence[str],
    *,
    dim: int,
    timeout: float | None,
    call_timeout: float | None = None,
) -> np.ndarray:
    """Embeddings [len(titles), dim] in input order, in batches of similar length (as offline.encoder does).

    Raises ranker.errors.BackendError when the encoder fails, `timeout` (seconds, for all batches) passes
    or one batch takes longer than `call_timeout`. A query cache in front of the encoder is bypassed: a
    title is not a query, and a one-title batch must not take the cache's timeout."""
    if isinstance(encoder, CachedEncoder):
        encoder = encoder.uncached
    out = np.zeros((len(titles), dim), dtype=np.float32)
    if not titles:
        return out
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    ids, mask = tokenizer(list(titles))
    lengths = mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    # One batch at a time: query encodes queue between batches instead of behind the whole upsert.
    for start in range(0, len(order), ENCODE_BATCH):
        rows = order[start : start + ENCODE_BATCH]
        width = max(int(lengths[rows].max()), 1)
        limit = call_timeout
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BackendTimeout(BACKEND, f"embedding {len(titles)} titles took longer than {timeout:.1f} s")
            limit = remaining if limit is None else min(limit, remaining)
        vectors = await encoder.encode(ids[rows, :width], mask[rows, :width], timeout=limit)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(rows), dim) or not np.isfinite(vectors).all():
            raise BackendFailed(BACKEND, f"expected finite embeddings of shape {(len(rows), dim)}, got {vectors.shape}")
        out[rows] = vectors
    return out


class LiveCatalog:
    """The serving Ranker, with items upserted and deleted online. `current()` is what Rank uses."""

    def __init__(self, ranker: Ranker, *, tokenizer: TextTokenizer, as_of: date | None = None) -> None:
        self._base = ranker
        self._tokenizer = tokenizer
        self._snapshot = CatalogSnapshot.of(ranker.release, as_of=as_of)
        self._ranker = ranker
        self._journal: CatalogJournal | None = None
        self._disabled: str | None = None  # why updates are refused, when they are
        self._retired: str | None = None  # set when a release swap replaced this catalog (see retire)
        self._log: CatalogLog | None = None  # the change log shared by the replicas, when there is one
        self._log_id = FIRST  # the last entry of it applied here
        self._log_state = _LogState()  # what this replica knows of the log's last compaction and its size
        self._compaction: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self._call_timeout: float | None = None
        self._lock = asyncio.Lock()
        self._analyzer = Analyzer()  # its own: analysis runs in a worker thread, Stemmer objects are not shared
        self.dim = ranker.release.manifest.embedding_dim

    def current(self) -> Ranker:
        return self._ranker

    @property
    def snapshot(self) -> CatalogSnapshot:
        return self._snapshot

    @classmethod
    async def open(
        cls,
        ranker: Ranker,
        *,
        tokenizer: TextTokenizer,
        state_dir: Path | None,
        call_timeout: float | None = None,
        writable: bool = True,
    ) -> LiveCatalog:
        """The live catalog with the journal in `state_dir` replayed (None: changes are not persisted).

        A journal whose embeddings came from another text encoder (another release's) is replayed with
        the titles embedded again, which needs the encoder (BackendError otherwise), and rewritten.
        When the journal cannot be opened for writing, OSError, unless `writable` is False: then what
        it holds is replayed and updates are refused (NotConfigured)."""
        live = cls(ranker, tokenizer=tokenizer)
        if state_dir is None:
            log.warning("no state directory: catalog updates will not survive a restart")
            return live
        path = state_dir / JOURNAL_DIR / JOURNAL
        started = time.perf_counter()
        try:
            journal, header, changes = await asyncio.to_thread(CatalogJournal.open, path)
        except OSError as e:
            if writable:
                raise
            live._disabled = f"catalog updates are off: {path} is not writable ({e}); set RANKER_STATE_DIR"
            log.error("%s", live._disabled)
            header, changes, _ = await asyncio.to_thread(read, path)
            await live._replay(None, path, header, changes, call_timeout, started)
            return live
        try:
            await live._replay(journal, path, header, changes, call_timeout, started)
        except BaseException:
            journal.close()
            raise
        live._journal = journal
        return live

    @classmethod
    async def open_shared(
        cls, ranker: Ranker, *, tokenizer: TextTokenizer, shared: CatalogLog, call_timeout: float | None = None
    ) -> LiveCatalog:
        """The live catalog with the shared change log applied (the entries after the release manifest's
        catalog_log_through, all of them when it has none), then tailing it: changes another
        replica appends are applied here within milliseconds (docs/catalog-updates.md). The state
        directory's journal is not used. BackendError when the log cannot be read, or holds entries of another
        text encoder and Triton cannot embed them again."""
        live = cls(ranker, tokenizer=tokenizer)
        live._log, live._call_timeout = shared, call_timeout
        started = time.perf_counter()
        # A release exported from a catalog that already had the first entries' changes starts after them.
        live._log_id = ranker.release.manifest.catalog_log_through or FIRST
        entries = await shared.read(live._log_id)
        applied = await live._apply_entries(entries)
        log_name = getattr(shared, "key", type(shared).__name__)
        log.info(
            "catalog log %s replayed onto release %s in %.0f ms: %d entries after %s, %d items present, %d deleted",
            log_name,
            ranker.release.manifest.release_id,
            (time.perf_counter() - started) * 1000,
            len(entries),
            "its start" if live._log_id == FIRST else live._log_id,
            applied.inserted + applied.updated,
            applied.deleted,
        )
        live._follower = asyncio.create_task(live._follow(), name=f"catalog log {log_name}")
        return live

    async def _apply_entries(self, entries: Sequence[LogEntry], *, timed: bool = False) -> Applied:
        """Apply log entries (in their order) as one new snapshot; titles embedded by another text encoder are
        embedded again with this release's. Entries a compaction wrote to replace entries already applied here
        are skipped. Installs the snapshot and records the last entry as applied; `timed`: observes each applied
        entry's lag (ranker_catalog_log_lag_seconds)."""
        if not entries:
            return Applied()
        fresh, state = self._log_state.advance(self._log_id, entries)
        applied = Applied()
        if fresh:
            upserts, deletes, encoders = await asyncio.to_thread(fold_entries, fresh)
            mine = encoder_fingerprint(self._base.release.manifest)
            foreign = [i for i, (item, _) in enumerate(upserts) if encoders[item.item_id] != mine]
            if foreign:
                log.warning("catalog log: embedding %d items written with another text encoder again", len(foreign))
                await self._embed_again(upserts, foreign, self._call_timeout)
            snapshot, applied = await asyncio.to_thread(self._snapshot.apply, upserts, deletes, self._analyzer)
            # As in a journal replay: a delete of an item with no row here still makes its id known.
            self._install(snapshot.with_tombstones(applied.not_found))
            if timed:
                now_ms = time.time() * 1000  # the stream ids' clock is the Redis server's
                for entry in fresh:
                    observability.METRICS.catalog_log_lag.observe(max(0.0, now_ms - entry_order(entry.id)[0]) / 1000)
        self._log_id, self._log_state = entries[-1].id, state
        observability.METRICS.catalog_log_records.set(state.records)
        return applied

    async def _embed_again(
        self, upserts: list[tuple[CatalogItem, np.ndarray]], which: Sequence[int], call_timeout: float | None
    ) -> None:
        """Replace the embeddings of upserts[i], i in `which`, by this release's encoder's: they were written, to
        the journal or the shared log, with another text encoder. BackendError when Triton cannot embed them."""
        titles = [upserts[i][0].title for i in which]
        vectors = await embed_titles(
            self._base.encoder, self._tokenizer, titles, dim=self.dim, timeout=None, call_timeout=call_timeout
        )
        for i, vector in zip(which, vectors, strict=True):
            upserts[i] = (upserts[i][0], vector)

    def _compact_when_due(self) -> None:
        """Start compacting the shared log in the background once it has doubled since its last compaction."""
        if self._log is None or not self._log_state.compaction_due() or self._retired:
            return
        if self._compaction is None or self._compaction.done():
            self._compaction = asyncio.create_task(self._compact(self._log), name="catalog log compaction")

    async def _compact(self, shared: CatalogLog) -> None:
        started = time.perf_counter()
        try:
            done = await shared.compact()
        except BackendError as e:
            observability.METRICS.catalog_log_compactions.labels(result="failed").inc()
            log.warning("catalog log: compaction failed, the log is as it was: %s", e)
            return
        if done is None:
            observability.METRICS.catalog_log_compactions.labels(result="skipped").inc()
            log.info("catalog log: compaction skipped (other replicas kept appending, or the log is empty)")
            return
        observability.METRICS.catalog_log_compactions.labels(result="done").inc()
        log.info(
            "catalog log compacted through %s in %.0f ms: %d entries (%d item records) became %d (%d)",
            done.through,
            (time.perf_counter() - started) * 1000,
            done.entries_before,
            done.records_before,
            done.entries_after,
            done.records_after,
        )

    async def _follow(self) -> None:
        """Until cancelled: apply the entries other replicas append to the shared log."""
        assert self._log is not None
        failing = ""
        while not self._retired:
            try:
                entries = await self._log.wait(self._log_id, block_s=FOLLOW_BLOCK_S)
                if entries:
                    async with self._lock:
                        fresh = [e for e in entries if after(e.id, self._log_id)]  # a local write may be ahead
                        if fresh and not self._retired:
                            applied = await self._apply_entries(fresh, timed=True)
                            log.info(
                                "catalog log: %d entries from other replicas applied up to %s (%d deleted)",
                                len(fresh),
                                self._log_id,
                                applied.deleted,
                            )
                failing = ""
            except Exception as e:  # the tail must outlive any one failure
                if str(e) != failing:  # once per distinct failure, not once a second
                    log.error(
                        "catalog log: cannot apply new entries, retrying every %.0f s: %s",
                        FOLLOW_RETRY_S,
                        e,
                        exc_info=not isinstance(e, BackendError),  # a traceback for what is not a backend's fault
                    )
                    failing = str(e)
                await asyncio.sleep(FOLLOW_RETRY_S)

    async def _replay(
        self,
        journal: CatalogJournal | None,
        path: Path,
        header: JournalHeader | None,
        changes: list[Change],
        call_timeout: float | None,
        started: float,
    ) -> None:
        manifest = self._base.release.manifest
        current = JournalHeader(release_id=manifest.release_id, encoder=encoder_fingerprint(manifest), dim=self.dim)
        upserts, deletes = fold(changes)
        reembed = header is not None and (header.encoder, header.dim) != (current.encoder, current.dim)
        if reembed and upserts:
            log.warning(
                "catalog journal %s was written with another text encoder (release %s); embedding its %d items again",
                path,
                header.release_id if header else "?",
                len(upserts),
            )
            await self._embed_again(upserts, range(len(upserts)), call_timeout)
        snapshot, applied = await asyncio.to_thread(self._snapshot.apply, upserts, deletes, self._analyzer)
        # A journaled delete names an item that existed when it was deleted. Without a row here (created
        # online and folded away, or absent from this release) its id stays known: requests naming it are
        # still valid, as for any deleted item, and it ranks nowhere.
        self._install(snapshot.with_tombstones(applied.not_found))
        total = entries(changes)
        compact = total >= COMPACT_MIN_ENTRIES and total > 2 * (len(upserts) + len(deletes))
        if journal is not None and (header is None or reembed or compact):
            compacted: list[Change] = []
            if deletes:
                compacted.append(Delete(tuple(deletes)))
            if upserts:
                compacted.append(Upsert(tuple(i for i, _ in upserts), np.array([e for _, e in upserts], np.float32)))
            await asyncio.to_thread(journal.rewrite, current, compacted)
        log.info(
            "catalog journal %s replayed onto release %s in %.0f ms: %d upserted, %d deleted (%d ids not present)",
            path,
            manifest.release_id,
            (time.perf_counter() - started) * 1000,
            len(upserts),
            applied.deleted,
            len(applied.not_found),
        )

    async def upsert(self, items: Sequence[CatalogItem], *, timeout: float | None) -> Applied:
        """Add or replace items; their titles are embedded first, then the batch is applied whole."""
        self._check_open()
        started = time.perf_counter()
        vectors = await embed_titles(
            self._base.encoder, self._tokenizer, [item.title for item in items], dim=self.dim, timeout=timeout
        )
        encoded = time.perf_counter()
        applied = await self._commit(Upsert(tuple(items), vectors))
        log.info(
            "catalog upsert: %d inserted, %d updated in %.1f ms (embedding %.1f ms)",
            applied.inserted,
            applied.updated,
            (time.perf_counter() - started) * 1000,
            (encoded - started) * 1000,
        )
        return applied

    async def delete(self, item_ids: Sequence[str]) -> Applied:
        """Remove items; ids not in the catalog are reported in `not_found`."""
        self._check_open()
        applied = await self._commit(Delete(tuple(item_ids)))
        log.info("catalog delete: %d deleted, %d not found", applied.deleted, len(applied.not_found))
        return applied

    async def _commit(self, change: Change) -> Applied:
        # Shielded: once the change may be in the journal, it must be in memory too, even if the
        # caller goes away meanwhile.
        return await asyncio.shield(self._apply(change))

    async def _apply(self, change: Change) -> Applied:
        async with self._lock:
            if self._retired:  # retired while this change waited for the lock
                raise CatalogRetired(self._retired)
            if self._log is not None:
                return await self._apply_shared(change, self._log)
            snapshot, applied, record = await self._next(change)
            if self._journal is not None and record is not None:
                try:
                    await asyncio.to_thread(self._journal.append, record)
                except JournalError as e:
                    log.error("catalog change not applied: %s", e)
                    raise BackendUnavailable("catalog journal", "cannot persist the change; nothing was applied") from e
            self._install(snapshot)
            return applied

    async def _apply_shared(self, change: Change, shared: CatalogLog) -> Applied:
        """Append the change to the shared log and apply it here in log order (under the lock): first the
        entries before it, so every replica ends in the same state; it is visible here when this returns."""
        await self._apply_entries(await shared.read(self._log_id))  # catch up: deletes are checked against the latest
        snapshot, applied, record = await self._next(change)
        if record is None:
            return applied
        manifest = self._base.release.manifest
        entry_id = await shared.append(record, encoder=encoder_fingerprint(manifest), dim=self.dim)
        # From here the change is in the log: a failure below leaves it to the tail (a retry is safe).
        others = [e for e in await shared.read(self._log_id, until=entry_id) if e.id != entry_id]
        if others:  # another replica appended in between: its changes come first here too
            await self._apply_entries(others)
            snapshot, applied, _ = await self._next(record)
        self._install(snapshot)
        self._log_id, self._log_state = entry_id, self._log_state.appended(record)
        self._compact_when_due()
        return applied

    async def _next(self, change: Change) -> tuple[CatalogSnapshot, Applied, Change | None]:
        """The next snapshot with `change` applied, what it changed, and the change to record (journal or log):
        a delete keeps only the ids it found, since a recorded absent id would delete that item from a later
        release that has it, at the next start or swap; None when nothing is left to record."""
        upserts, deletes = _parts(change)
        snapshot, applied = await asyncio.to_thread(self._snapshot.apply, upserts, deletes, self._analyzer)
        if isinstance(change, Delete):
            absent = set(applied.not_found)
            change = Delete(tuple(i for i in change.item_ids if i not in absent))
            if not change.item_ids:
                return snapshot, applied, None
        return snapshot, applied, change

    def _install(self, snapshot: CatalogSnapshot) -> None:
        self._snapshot = snapshot
        self._ranker = self._base.with_release(snapshot.release)

    def _check_open(self) -> None:
        if self._retired:
            raise CatalogRetired(self._retired)
        if self._disabled:
            raise NotConfigured(self._disabled)

    @contextlib.asynccontextmanager
    async def updates_paused(self) -> AsyncIterator[None]:
        """Updates wait while the block runs (a release swap replays this catalog's journal onto the next
        release meanwhile, see ranker.swap); one being applied finishes first."""
        async with self._lock:
            yield

    def retire(self, reason: str) -> None:
        """Refuse every later update with CatalogRetired and close the journal: another LiveCatalog owns it now.
        Call it inside updates_paused(), so that no update is applied half here and half there."""
        self._retired = reason
        self.close()

    def close(self) -> None:
        """Close the journal; later updates are refused (CatalogRetired)."""
        self._retired = self._retired or "the catalog is closed"
        journal, self._journal = self._journal, None  # closed once: the descriptor number may be reused
        if journal is not None:
            journal.close()
        for task in (self._follower, self._compaction):
            if task is not None:
                task.cancel()  # the shared log itself belongs to the server, which closes it
        self._follower = self._compaction = None


def _parts(change: Change) -> tuple[list[tuple[CatalogItem, np.ndarray]], tuple[str, ...]]:
    """(upserts, deletes) of one change, as CatalogSnapshot.apply takes them."""
    if isinstance(change, Upsert):
        return list(zip(change.items, change.embeddings, strict=True)), ()
    return [], change.item_ids


@dataclass(frozen=True)
class _LogState:
    """What a replica knows of the shared log up to the entry it applied last: the last compaction in it
    (its `through`, and whether this replica applied its entries or had applied what they replace) and the
    item records since the log's start, in that compaction and after it."""

    compaction: str | None = None
    applying: bool = False
    compacted_records: int = 0
    records_after: int = 0

    @property
    def records(self) -> int:
        return self.compacted_records + self.records_after

    def advance(self, position: str, log_entries: Sequence[LogEntry]) -> tuple[list[LogEntry], _LogState]:
        """The entries to apply of those after `position`, and the state after them all."""
        state, fresh = self, []
        for entry in log_entries:
            size = entries([entry.change])
            if entry.through is None:
                state = replace(state, records_after=state.records_after + size)
            else:
                if entry.through != state.compaction:  # the first entry of a compaction: it replaces the log so far
                    # and was applied here already when `position` is at or past the last entry it replaces
                    state = _LogState(compaction=entry.through, applying=after(entry.through, position))
                state = replace(state, compacted_records=state.compacted_records + size)
            if entry.through is None or state.applying:
                fresh.append(entry)
            position = entry.id
        return fresh, state

    def appended(self, change: Change) -> _LogState:
        return replace(self, records_after=self.records_after + entries([change]))

    def compaction_due(self) -> bool:
        return self.records >= COMPACT_MIN_ENTRIES and self.records_after >= max(self.compacted_records, 1)
