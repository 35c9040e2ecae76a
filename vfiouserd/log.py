"""Structured logging: one logfmt line per event on stderr.

journald (or whoever holds stderr) adds its own timestamps, but a line is
still readable on a terminal: ``ts=... level=info event=ring.start queue=0``.
Every event has a dotted name, so a reader can grep for ``event=vhost.``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

TRACE = 5  # below DEBUG: one line per guest request / register access
logging.addLevelName(TRACE, "trace")

_LEVEL_NAMES = {
    TRACE: "trace",
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}


def _quote(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    text = str(value)
    if text and all(c.isalnum() or c in "._-/:+,[]" for c in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        parts = [
            f"ts={now}.{int(record.msecs):03d}",
            f"level={_LEVEL_NAMES.get(record.levelno, record.levelname.lower())}",
            f"event={record.getMessage()}",
        ]
        parts.extend(f"{key}={_quote(value)}" for key, value in fields.items())
        if record.exc_info:
            parts.append(f"exception={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class EventLogger:
    """A thin wrapper so call sites read ``log.info("ring.start", queue=0)``."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(f"vfiouserd.{name}")

    def _log(self, level: int, event: str, fields: dict[str, Any], exc: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc)

    def trace(self, event: str, **fields: Any) -> None:
        self._log(TRACE, event, fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, exc=True)

    def is_tracing(self) -> bool:
        return self._logger.isEnabledFor(TRACE)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def configure(level: str = "info") -> None:
    """Route every vfiouserd event to stderr at ``level`` (trace/debug/info/...)."""
    numeric = TRACE if level == "trace" else logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger("vfiouserd")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    root.propagate = False
