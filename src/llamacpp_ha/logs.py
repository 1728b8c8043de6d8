"""Log set-up: text or one JSON object per line, and the per-request access line.

What may appear in a log line is decided here and in the callers: request ids, key ids,
backend names, statuses, timings and token counts. Never a prompt, a completion or a key.
Every message and field is escaped and cut by `logsafe` here, in the formatters.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import Any

from . import logsafe

ACCESS = logging.getLogger("llamacpp_ha.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": logsafe.message(record),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: logsafe.value(v) for k, v in fields.items()})
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__  # the type only: see module doc
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += " " + " ".join(
                f"{k}={logsafe.text_value(v)}" for k, v in fields.items() if v is not None
            )
        return line

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = logsafe.message(record)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return f"({ei[0].__name__})" if ei and ei[0] else ""


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # uvicorn's own loggers bring their own handlers; send them through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def set_level(level: str) -> None:
    """At start and on reload. uvicorn gives its own loggers the level it started with."""
    logging.getLogger().setLevel(level.upper())
    for name in ("uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logging.getLogger(name).setLevel(level.upper())


def access(message: str, fields: dict[str, Any], level: int = logging.INFO) -> None:
    ACCESS.log(level, message, extra={"fields": fields})


def access_enabled(level: int = logging.INFO) -> bool:
    """Whether an access line at `level` is written: asked first, so that a request's fields
    are not gathered for a line that is not (`--log-level warning`)."""
    return ACCESS.isEnabledFor(level)


def location(exc: BaseException) -> str:
    """Where `exc` was raised (" at file:line"), to log with its type instead of its message."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    return f" at {where.filename}:{where.lineno}" if where else ""
