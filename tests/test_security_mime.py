"""The bytes of a message: no header injection, subjects folded and encoded so they decode exactly.

These drive `OutgoingMessage.to_mime()` directly, below validation, because it
is the last line of defence for every transport that sends MIME (file sink,
SMTP): even a value validation would refuse must not inject a header here.
Python 3.11's email package decodes RFC 2047 encoded-words in a value it is
given (so `=?utf-8?q?x=0D=0ABcc:...?=` became a real Bcc header) and drops
spaces when folding long non-ASCII subjects; these tests pin both down.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.errors import PermanentDeliveryError
from tests.transport_contract import make_message

EXPECTED_HEADERS = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "X-Ticket-ID",
    "MIME-Version",
    "Content-Type",
]


def parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def header_block(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


ENCODED_WORD_INJECTIONS = [
    "=?utf-8?q?x=0D=0ABcc:_evil@evil.example?=",
    "TKT=?utf-8?b?DQpCY2M6IGV2aWxAZXZpbC5leGFtcGxl?=",
    "T =?utf-8?b?DQpCY2M6IGV2aWxAZXZpbC5leGFtcGxl?=",
    "=?iso-8859-1?q?=0ABcc=3A_evil=40evil.example?=",
    "=?utf-8?q?hello?=",
]


@pytest.mark.parametrize("value", ENCODED_WORD_INJECTIONS)
def test_encoded_words_in_a_header_value_stay_literal_text(value: str) -> None:
    raw = make_message(subject=f"Support: {value}", headers={"X-Ticket-ID": value}).as_bytes()
    message = parse(raw)
    assert list(message.keys()) == EXPECTED_HEADERS, "an encoded-word injected a header"
    assert "Bcc" not in message
    assert str(message["X-Ticket-ID"]) == value
    assert str(message["Subject"]) == f"Support: {value}"


@pytest.mark.parametrize(
    "value",
    [
        "TKT-1\r\nBcc: evil@evil.example",
        "TKT-1\nBcc: evil@evil.example",
        "TKT-1\rBcc: evil@evil.example",
        "TKT-1\u2028Bcc: evil@evil.example",
        "TKT-1\u2029x",
        "TKT-1\x85x",
        "TKT-1\x00",
        "TKT-1\x0bx",
    ],
    ids=["crlf", "lf", "cr", "u2028", "u2029", "nel", "nul", "vt"],
)
@pytest.mark.parametrize("where", ["subject", "header"])
def test_line_breaks_in_a_header_value_are_refused(value: str, where: str) -> None:
    message = (
        make_message(subject=value) if where == "subject" else make_message(headers={"X-Ticket-ID": value})
    )
    with pytest.raises(PermanentDeliveryError, match="control character"):
        message.as_bytes()


@pytest.mark.parametrize(
    "recipient",
    [
        "=?utf-8?q?evil=40evil.example?=@example.com",
        "jöhn@example.com",
        "john@exämple.com",
        "john@example.com\r\nBcc: evil@evil.example",
    ],
)
def test_addresses_that_email_would_mangle_are_refused(recipient: str) -> None:
    with pytest.raises(PermanentDeliveryError):
        make_message(recipients=(recipient,)).as_bytes()


def test_a_refused_header_is_a_permanent_delivery_failure_not_a_crash() -> None:
    """Transports let it through to the dispatcher, which fails the delivery without retrying."""
    with pytest.raises(PermanentDeliveryError) as caught:
        make_message(headers={"X-Ticket-ID": "a\r\nb"}).to_mime()
    assert not caught.value.transport_level


def test_long_non_ascii_subject_keeps_every_space() -> None:
    subject = "Support Ticket Created: " + "ดอกเบี้ย " * 20 + "end"
    raw = make_message(subject=subject).as_bytes()
    assert str(parse(raw)["Subject"]) == subject
    lines = header_block(raw)
    assert all(line.isascii() for line in lines)
    assert max(len(line) for line in lines) <= 78
    assert sum(1 for line in lines if line.startswith(b" ")) >= 3, "a long subject is folded"


def test_ascii_subject_stays_readable_and_gets_no_leading_space() -> None:
    subject = "New Support Ticket: <script>alert(1)</script>-TKT-2025-000001-UC2 (UC2)"
    raw = make_message(subject=subject).as_bytes()
    assert str(parse(raw)["Subject"]) == subject
    assert b"Subject: New Support Ticket:" in raw  # plain ASCII is not turned into encoded-words


def test_subject_read_back_in_memory_is_the_decoded_value() -> None:
    """Transports that read headers off the EmailMessage (aiosmtplib) see the real values."""
    subject = "Financial Coaching Request: TKT-2025-001235 — ดอกเบี้ย"
    mime = make_message(subject=subject, headers={"X-Ticket-ID": "=?utf-8?q?x?="}).to_mime()
    assert str(mime["Subject"]) == subject
    assert str(mime["X-Ticket-ID"]) == "=?utf-8?q?x?="


header_text = st.text(
    st.characters(exclude_categories=["Cc", "Cs", "Zl", "Zp"], exclude_characters="\x85"), max_size=200
)


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(subject=header_text, ticket=header_text)
@example(subject=" leading space", ticket="  ")
@example(subject="trailing space ", ticket=" ")
@example(subject="x" * 300, ticket="=?utf-8?q?x?= " * 20)
@example(subject="ดอกเบี้ย " * 30, ticket="a  b   c" * 20)
def test_any_printable_subject_and_header_decode_exactly(subject: str, ticket: str) -> None:
    raw = make_message(subject=subject, headers={"X-Ticket-ID": ticket}).as_bytes()
    message = parse(raw)
    assert list(message.keys()) == EXPECTED_HEADERS
    assert str(message["Subject"]) == subject
    assert str(message["X-Ticket-ID"]) == ticket
    lines = header_block(raw)
    assert all(line.isascii() for line in lines)
    assert max(len(line) for line in lines) <= 998


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(words=st.lists(st.from_regex(r"[!-~]{1,12}", fullmatch=True), min_size=1, max_size=30))
def test_ascii_subjects_fold_at_spaces_within_78_characters(words: list[str]) -> None:
    subject = " ".join(words)
    raw = make_message(subject=subject).as_bytes()
    assert str(parse(raw)["Subject"]) == subject
    assert max(len(line) for line in header_block(raw)) <= 78
