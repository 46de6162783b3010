"""Log output: text for people or one JSON object per line for machines, stamped with the request id."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]

# Set by the RPC interceptor (ranker.observability) for the duration of one RPC; asyncio tasks and
# asyncio.to_thread inherit it, so every line logged on behalf of a request carries its id.
REQUEST_ID: ContextVar[str | None] = ContextVar("ranker_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is emitted as a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
}
_JSON_RESERVED = ("ts", "level", "logger", "msg", "request_id", "exc")


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller passed with `extra=` (not LogRecord's own attributes)."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")}


class RequestIdFilter(logging.Filter):
    """Copies the current request id (or None outside a request) onto each record as `request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id (in a request), extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        for key, value in extras(record).items():
            entry[key if key not in _JSON_RESERVED else f"extra_{key}"] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request_id]: message key=value ...` for people reading a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s%(extra_text)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        extra_text = "".join(f" {k}={v}" for k, v in extras(record).items())
        # A copy, so other handlers of the same record do not see these two display-only attributes.
        shown = logging.makeLogRecord(
            {**vars(record), "request_tag": f" [{request_id}]" if request_id else "", "extra_text": extra_text}
        )
        return super().format(shown)


class FieldsFilter(logging.Filter):
    """Puts the same fields on every record (e.g. `worker`, the process's index among RANKER_WORKERS)."""

    def __init__(self, fields: Mapping[str, Any]) -> None:
        super().__init__()
        self.fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def configure_logging(
    level: str | int, fmt: LogFormat, stream: TextIO | None = None, fields: Mapping[str, Any] | None = None
) -> logging.Handler:
    """Replace the root logger's handlers with one that writes `fmt` to stderr (or `stream`), each line with
    `fields` added as if passed with `extra=`."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    if fields:
        handler.addFilter(FieldsFilter(fields))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler
