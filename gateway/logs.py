"""Logging to stderr: readable lines in dev, one JSON object per line in prod.

Log calls pass context as `extra={...}` (ticket_id, email_id, use_case, transport,
attempt, duration_ms, recipient). Customer addresses go through `mask_address`
before they reach a log call; query text is never logged at INFO.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

#: `extra` keys rendered by the formatters, in this order
CONTEXT_KEYS = (
    "ticket_id",
    "email_id",
    "use_case",
    "role",
    "transport",
    "attempt",
    "duration_ms",
    "recipient",
    "status",
    "error",
)

#: third-party loggers that are chatty (azure-core logs every request at INFO) or could echo payloads
QUIET_LOGGERS = {
    "azure": logging.WARNING,
    "azure.core.pipeline.policies.http_logging_policy": logging.WARNING,
    "uvicorn.access": logging.WARNING,
    "httpx": logging.WARNING,
    "httpx2": logging.WARNING,
    "mcp": logging.INFO,
    "aiosmtplib": logging.INFO,
    "sqlalchemy": logging.WARNING,
    "aiosqlite": logging.WARNING,
}


def mask_address(address: str | None) -> str:
    """c***@example.com: enough to tell recipients apart in a log, not enough to mail them."""
    if not address or "@" not in address:
        return "***"
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {key: getattr(record, key) for key in CONTEXT_KEYS if getattr(record, key, None) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class ReadableFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        if context:
            line += "  " + " ".join(f"{k}={v}" for k, v in context.items())
        return line


def configure(level: str, json_lines: bool) -> None:
    """Replace the root handlers with one stderr handler; call before anything logs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else ReadableFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    numeric = logging.getLevelName(level)
    for name, floor in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(floor, numeric))
