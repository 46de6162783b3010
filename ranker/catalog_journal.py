"""The catalog journal: each online catalog change, fsynced before it is acknowledged, replayed at start.

    STATE_DIR/catalog/journal.jsonl, one change per line, each line "<crc32 hex> <json>\\n":
      {"kind": "header", "format": 1, "release_id": ..., "encoder": <fingerprint>, "dim": 384}
      {"kind": "upsert", "items": [{item_id, title, ...}], "embeddings": <base64 float32 little-endian>}
      {"kind": "delete", "item_ids": [...]}

Upserts carry the embeddings Triton computed, so a restart replays them without Triton; the header
says which text encoder computed them (see ranker.live_catalog.encoder_fingerprint). A torn last
line (a crash mid-write: that change was never acknowledged) is cut off at start; any other line
that fails its checksum stops the start with JournalError.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from ranker.domain import CatalogItem

FORMAT = 1
JOURNAL = "journal.jsonl"


class JournalError(RuntimeError):
    """The journal cannot be read or written."""


@dataclass(frozen=True, kw_only=True)
class JournalHeader:
    release_id: str  # the release the journal was (re)written against; informational
    encoder: str  # fingerprint of the text encoder that computed the embeddings
    dim: int


@dataclass(frozen=True)
class Upsert:
    items: tuple[CatalogItem, ...]
    embeddings: np.ndarray  # float32 [len(items), dim]


@dataclass(frozen=True)
class Delete:
    item_ids: tuple[str, ...]


Change = Upsert | Delete


def fold(changes: Iterable[Change]) -> tuple[list[tuple[CatalogItem, np.ndarray]], list[str]]:
    """The net effect of the changes: the last upsert of each id still present (in the order they were
    last written) and the ids whose last change is a delete."""
    upserts: dict[str, tuple[CatalogItem, np.ndarray]] = {}
    deletes: dict[str, None] = {}
    for change in changes:
        if isinstance(change, Upsert):
            for item, embedding in zip(change.items, change.embeddings, strict=True):
                upserts.pop(item.item_id, None)
                deletes.pop(item.item_id, None)
                upserts[item.item_id] = (item, embedding)
        else:
            for item_id in change.item_ids:
                upserts.pop(item_id, None)
                deletes.pop(item_id, None)
                deletes[item_id] = None
    return list(upserts.values()), list(deletes)


def entries(changes: Iterable[Change]) -> int:
    """Item entries in the changes (a measure of how much a compaction would save)."""
    return sum(len(c.items) if isinstance(c, Upsert) else len(c.item_ids) for c in changes)


def _item_json(item: CatalogItem) -> dict[str, Any]:
    data: dict[str, Any] = {"item_id": item.item_id, "title": item.title}
    for name in ("category", "brand", "price", "popularity", "rating", "margin", "boost", "in_stock"):
        value = getattr(item, name)
        if value is not None:
            data[name] = value
    if item.created_at is not None:
        data["created_at"] = item.created_at.isoformat()
    return data


def _item(data: dict[str, Any]) -> CatalogItem:
    created = data.get("created_at")
    fields = {k: v for k, v in data.items() if k != "created_at"}
    return CatalogItem(**fields, created_at=date.fromisoformat(created) if created else None)


def _encode(record: dict[str, Any]) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _header_line(header: JournalHeader) -> bytes:
    record = {"kind": "header", "format": FORMAT, "release_id": header.release_id, "encoder": header.encoder}
    return _encode({**record, "dim": header.dim})


def _change_line(change: Change) -> bytes:
    if isinstance(change, Delete):
        return _encode({"kind": "delete", "item_ids": list(change.item_ids)})
    vectors = np.ascontiguousarray(change.embeddings, dtype="<f4")
    return _encode(
        {
            "kind": "upsert",
            "items": [_item_json(item) for item in change.items],
            "embeddings": base64.b64encode(vectors.tobytes()).decode("ascii"),
        }
    )


def _decode(line: bytes) -> dict[str, Any] | None:
    """The record of one line, or None when the line is damaged."""
    crc, _, payload = line.rstrip(b"\n").partition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _change(record: dict[str, Any], dim: int) -> Change:
    if record["kind"] == "delete":
        return Delete(tuple(record["item_ids"]))
    items = tuple(_item(data) for data in record["items"])
    vectors = np.frombuffer(base64.b64decode(record["embeddings"]), dtype="<f4").astype(np.float32)
    return Upsert(items, vectors.reshape(len(items), dim))


def encode_change(change: Change) -> bytes:
    """One change as a self-checking record ("<crc32 hex> <json>\\n"), as a journal line holds it."""
    return _change_line(change)


def decode_change(data: bytes, dim: int) -> Change:
    """The change `encode_change` wrote; JournalError when the record is damaged or not a change."""
    record = _decode(data)
    if record is None:
        raise JournalError("damaged change record (checksum or JSON)")
    try:
        return _change(record, dim)
    except (KeyError, TypeError, ValueError) as e:
        raise JournalError(f"not a valid change record: {e}") from e


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: Path) -> tuple[JournalHeader | None, list[Change], int]:
    """Header, changes and the length of the intact prefix (a torn last line is left out)."""
    if not path.is_file():
        return None, [], 0
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    header: JournalHeader | None = None
    changes: list[Change] = []
    good = 0
    for number, line in enumerate(lines, 1):
        record = _decode(line) if line.endswith(b"\n") else None
        if record is None:
            if number == len(lines):
                break  # torn tail: never acknowledged
            raise JournalError(f"{path}: line {number} is damaged (checksum or JSON); refusing to guess")
        try:
            if header is None:
                if record.get("kind") != "header" or record.get("format") != FORMAT:
                    raise JournalError(f"{path}: line 1 is not a format-{FORMAT} journal header")
                header = JournalHeader(release_id=record["release_id"], encoder=record["encoder"], dim=record["dim"])
            else:
                changes.append(_change(record, header.dim))
        except (KeyError, TypeError, ValueError) as e:
            raise JournalError(f"{path}: line {number} is not a valid record: {e}") from e
        good += len(line)
    return header, changes, good


class CatalogJournal:
    """Append-only, fsynced writer of one journal file; `open` reads what it holds first."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._broken: str | None = None

    @classmethod
    def open(cls, path: Path) -> tuple[CatalogJournal, JournalHeader | None, list[Change]]:
        """The journal at `path` (created when absent), its header and changes; a torn tail is cut off."""
        path.parent.mkdir(parents=True, exist_ok=True)
        header, changes, good = read(path)
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != good:
                os.ftruncate(fd, good)
                os.fsync(fd)
            if not existed:
                _fsync_directory(path.parent)
        except OSError:
            os.close(fd)
            raise
        return cls(path, fd), header, changes

    def append(self, change: Change) -> None:
        """Write one change and fsync it; on failure the file is cut back, so it never holds half a change."""
        if self._broken:
            raise JournalError(f"{self.path} is not writable since an earlier failure: {self._broken}")
        self._write([_change_line(change)])

    def rewrite(self, header: JournalHeader, changes: Sequence[Change]) -> None:
        """Replace the whole journal (a new header, compacted changes) atomically: temp file, fsync, rename.
        From the rename on, this writer appends to the new file, even if what follows the rename fails."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with os.fdopen(os.dup(fd), "wb") as f:
                f.write(_header_line(header))
                for change in changes:
                    f.write(_change_line(change))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            os.close(fd)
            raise
        old, self._fd, self._broken = self._fd, fd, None
        os.close(old)
        _fsync_directory(self.path.parent)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _write(self, lines: list[bytes]) -> None:
        try:
            mine = os.fstat(self._fd)
            size = mine.st_size
            at_path = os.stat(self.path)
        except OSError as e:
            self._broken = f"{type(e).__name__}: {e}"
            raise JournalError(f"cannot write {self.path}: {e}") from e
        if (mine.st_dev, mine.st_ino) != (at_path.st_dev, at_path.st_ino):
            # Another writer (the next release's catalog, in a swap that then failed) replaced the file: a line
            # written here would land in the unlinked file and be lost at restart.
            raise JournalError(f"{self.path} was replaced by another writer; restart or load the release again")
        try:
            for line in lines:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, size)
                os.fsync(self._fd)
            except OSError as again:
                self._broken = f"{type(again).__name__}: {again}"
            raise JournalError(f"cannot write {self.path}: {e}") from e
