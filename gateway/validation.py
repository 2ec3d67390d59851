"""Checks on everything a caller sends: each failure names the field and what is allowed."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from gateway.errors import InputError

#: C0/C1 controls except tab and newlines, plus Unicode line/paragraph separators
#: and bidirectional overrides that can disguise text.
_FORBIDDEN_TEXT = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]"
)


def check_address(value: str) -> str:
    """A plain address (no display name), syntax only: no DNS look-up. Returns it normalized."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("give an email address such as customer@example.com")
    try:
        result = validate_email(value.strip(), check_deliverability=False, test_environment=True)
    except EmailNotValidError as err:
        raise ValueError(f"not a valid email address: {err}") from None
    return result.normalized


@dataclass(frozen=True)
class Limits:
    ticket_id_pattern: str
    customer_id_pattern: str
    query_max_chars: int
    reason_max_chars: int


def _identifier(field: str, value: object, pattern: str, example: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{field} is required (for example {example})", field=field)
    value = value.strip()
    if not re.fullmatch(pattern, value):
        raise InputError(
            f"{field} {_preview(value)} is not allowed: it must match {pattern} (for example {example})",
            field=field,
        )
    return value


def _free_text(field: str, value: object, max_chars: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{field} is required and must not be blank", field=field)
    text = unicodedata.normalize("NFC", value.replace("\r\n", "\n").replace("\r", "\n"))
    if len(text) > max_chars:
        raise InputError(
            f"{field} is {len(text)} characters long; the limit is {max_chars}. Shorten it.", field=field
        )
    bad = _FORBIDDEN_TEXT.search(text)
    if bad:
        raise InputError(
            f"{field} contains the control character U+{ord(bad.group()):04X}; "
            "only printable text, line breaks and tabs are allowed",
            field=field,
        )
    return text.strip("\n")


def _preview(value: str, limit: int = 40) -> str:
    shown = value if len(value) <= limit else value[:limit] + "…"
    return repr(shown)


def check_request(
    *,
    ticket_id: object,
    customer_id: object,
    customer_email: object,
    query: object,
    reason: object,
    limits: Limits,
) -> dict[str, str]:
    """Validate the free fields of one escalation; returns them cleaned."""
    cleaned = {
        "ticket_id": _identifier("ticket_id", ticket_id, limits.ticket_id_pattern, "TKT-2025-001234"),
        "customer_id": _identifier("customer_id", customer_id, limits.customer_id_pattern, "CUST-001"),
    }
    if not isinstance(customer_email, str):
        raise InputError(
            "customer_email is required (for example customer@example.com)", field="customer_email"
        )
    try:
        cleaned["customer_email"] = check_address(customer_email)
    except ValueError as err:
        raise InputError(f"customer_email: {err}", field="customer_email") from None
    cleaned["query"] = _free_text("query", query, limits.query_max_chars)
    cleaned["reason"] = _free_text("reason", reason, limits.reason_max_chars)
    return cleaned
