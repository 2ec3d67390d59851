"""Logging to stderr: readable lines in dev, one JSON object per line in prod.

Log calls pass context as `extra={...}` (ticket_id, email_id, use_case, transport,
attempt, duration_ms, recipient). Customer addresses go through `mask_address`
before they reach a log call; query text is never logged at INFO. As a safety
net the formatters mask every other email address they meet (an SMTP error
quoting the recipient, a traceback), except the gateway's own addresses named
with `show_in_full`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from types import TracebackType
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

#: third-party loggers that are chatty (azure-core logs every request at INFO) or could echo
#: payloads at DEBUG (the MCP SDK and HTTP clients log request bodies): their floor, whatever LOG_LEVEL says
QUIET_LOGGERS = {
    "azure": logging.WARNING,
    "azure.core.pipeline.policies.http_logging_policy": logging.WARNING,
    "azure.identity": logging.WARNING,
    "uvicorn.access": logging.WARNING,
    "httpx": logging.WARNING,
    "httpx2": logging.WARNING,
    "httpcore": logging.WARNING,
    "mcp": logging.INFO,
    "sse_starlette": logging.INFO,
    "aiosmtplib": logging.INFO,
    "sqlalchemy": logging.WARNING,
    "aiosqlite": logging.WARNING,
    "asyncio": logging.INFO,
}

#: an address as it appears in running text (key=value, <...>, quotes around it do not join it);
#: an already masked one (c***@example.com) does not match
_ADDRESS = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_shown_in_full: set[str] = set()


def mask_address(address: str | None) -> str:
    """c***@example.com: enough to tell recipients apart in a log, not enough to mail them."""
    if not address or "@" not in address:
        return "***"
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"


def show_in_full(*addresses: str) -> None:
    """The gateway's own addresses (sender, support team), which logs may show unmasked."""
    _shown_in_full.update(a.lower() for a in addresses if a)


def redact(text: str) -> str:
    """Mask every email address in `text` that is not one of the gateway's own."""
    if "@" not in text:
        return text

    def mask(match: re.Match[str]) -> str:
        found = match.group(0)
        return found if found.lower() in _shown_in_full else mask_address(found)

    return _ADDRESS.sub(mask, text)


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {key: getattr(record, key) for key in CONTEXT_KEYS if getattr(record, key, None) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, then the context keys present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in _context(record).items():
            entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc_info"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exc_info"] = redact(record.exc_text)
        return json.dumps(entry, ensure_ascii=False, default=str)


class ReadableFormatter(logging.Formatter):
    """`18:02:01 INFO    gateway.service: Sending email ...  ticket_id=... use_case=UC2`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        if context:
            head, newline, rest = line.partition("\n")
            line = head + "  " + " ".join(f"{k}={v}" for k, v in context.items()) + newline + rest
        return redact(line)


def _log_uncaught(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """Keep even a crash's traceback on one JSON line."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, tb)
        return
    logging.getLogger("gateway").critical("uncaught %s: %s", kind.__name__, error, exc_info=(kind, error, tb))


def configure(level: str, json_lines: bool) -> None:
    """Replace the root handlers with one stderr handler; call before anything logs.

    Uvicorn is started with `log_config=None`, so its own lines propagate to this
    handler and come out in the same format.
    """
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
    logging.captureWarnings(True)  # warnings.warn output becomes log records too
    # Neither format shows where a call was made, nor thread or process: the logging HOWTO's
    # "Optimization" switches skip collecting them for every record (1.5 of 12 µs per line).
    logging._srcfile = None  # the HOWTO's documented switch
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if json_lines:
        sys.excepthook = _log_uncaught
