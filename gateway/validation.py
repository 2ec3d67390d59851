"""Checks on everything a caller sends: each failure names the field and what is allowed.

Identifiers end up in mail headers (Subject, X-Ticket-ID) and links, free text in
both bodies. So beyond the configured patterns and caps, anything that could
break out of a header or disguise text is refused here, whatever the
configuration allows: control characters, Unicode line separators, bidi
overrides, lone surrogates and RFC 2047 encoded-words (`=?utf-8?q?...?=`, which
Python's email package decodes when a header is set, CR/LF included).
Error messages never echo a customer address in full (the MCP SDK logs tool
errors at INFO).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from email_validator import EmailNotValidError, validate_email

from gateway.errors import InputError
from gateway.logs import mask_address

#: C0/C1 controls except tab and newlines, Unicode line/paragraph separators, bidirectional
#: embeddings/overrides/isolates that can disguise text, the BOM and lone surrogates.
_FORBIDDEN_TEXT = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]"
)
#: identifiers are one line: tab and newlines are refused too
_FORBIDDEN_ID = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")
#: the start of an RFC 2047 encoded-word
ENCODED_WORD = re.compile(r"=\?")
#: something that looks like an email address inside a value we echo back
_ADDRESS_LIKE = re.compile(r"[^\s@'\"<>(),;:]+@[^\s@'\"<>(),;:]+")

#: a hard ceiling for identifiers, whatever the configured pattern allows
MAX_ID_CHARS = 256


def check_address(value: str) -> str:
    """A plain ASCII address (no display name), syntax only: no DNS look-up.

    Returns it normalized (the domain lower-cased; the part before the @ as given), an
    internationalized domain in its ASCII (IDNA) form.
    Non-ASCII local parts need SMTPUTF8, which not every transport offers, so
    they are refused with a message that says so rather than mis-delivered.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("an email address is required (for example customer@example.com)")
    value = value.strip()
    if ENCODED_WORD.search(value):
        raise ValueError("an RFC 2047 encoded-word (=?...?=) is not allowed in an address")
    try:
        result = validate_email(
            value,
            check_deliverability=False,
            test_environment=True,
            allow_smtputf8=False,
            strict=True,
        )
    except EmailNotValidError as err:
        raise ValueError(f"not a valid email address: {_masked(str(err), value)}") from None
    return result.ascii_email or result.normalized


@dataclass(frozen=True)
class Limits:
    ticket_id_pattern: str
    customer_id_pattern: str
    query_max_chars: int
    reason_max_chars: int


def _identifier(field: str, value: object, pattern: str, example: str) -> str:
    # The built-in example is shown only when the configured pattern accepts it.
    hint = f" (for example {example})" if re.fullmatch(pattern, example) else ""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{field} is required{hint}", field=field)
    value = value.strip()
    if len(value) > MAX_ID_CHARS:
        raise InputError(
            f"{field} is {len(value)} characters long; the limit is {MAX_ID_CHARS}{hint}", field=field
        )
    # Checked before the configured pattern, which may be permissive: these would reach mail headers.
    bad = _FORBIDDEN_ID.search(value)
    if bad:
        raise InputError(
            f"{field} contains the control character U+{ord(bad.group()):04X}; an identifier is one line "
            f"of printable characters{hint}",
            field=field,
        )
    if ENCODED_WORD.search(value):
        raise InputError(
            f"{field} must not contain '=?' (an RFC 2047 encoded-word could rewrite mail headers){hint}",
            field=field,
        )
    if not re.fullmatch(pattern, value):
        raise InputError(
            f"{field} {_preview(value)} is not allowed: it must match {pattern}{hint}", field=field
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
    return repr(_ADDRESS_LIKE.sub(lambda m: mask_address(m.group()), shown))


def _masked(message: str, address: str) -> str:
    """The validator's message with the caller's address (if it echoed it) masked."""
    return message.replace(address, mask_address(address)) if "@" in address else message


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
