"""`OutgoingMessage.as_bytes()`: what the SMTP transport and the file sink send.

It must be 7-bit clean (byte for byte what aiosmtplib's `flatten_message(...,
cte_type="7bit")` writes for the same message, so no relay needs 8BITMIME), the
same on every call (the boundary comes from the Message-ID, so a retry sends
identical bytes), and parse back to both parts unchanged.
"""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta, timezone

from aiosmtplib.email import flatten_message
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.transport import OutgoingMessage
from tests.transport_contract import make_message

#: text as callers and templates produce it: any printable Unicode, every kind of line break,
#: trailing blanks and tabs, "=" signs, lines around the 76/78-character folding limits
BODY_TEXT = st.lists(
    st.one_of(
        st.sampled_from(["\n", "\r\n", "\r", " ", "\t", "=", ".", "From ", "x" * 70, "é", "✓", "…"]),
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    ),
    max_size=40,
).map("".join)
SUBJECT = st.text(
    st.characters(max_codepoint=0x2FF, blacklist_categories=("Cc", "Cs")), min_size=1, max_size=120
)


def written_by_the_email_package(message: OutgoingMessage) -> tuple[bytes, bytes]:
    return message.to_mime().as_bytes(), flatten_message(message.to_mime(), cte_type="7bit")


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(text=BODY_TEXT, html=BODY_TEXT, subject=SUBJECT)
@example(text="", html="", subject="s")
@example(text="a" * 77 + "=", html="b" * 76 + " \n" + "c" * 75 + "\t", subject="s")
@example(text="--===============0000000000==\n", html="=?utf-8?q?x?= ==", subject="=?utf-8?q?x?=")
def test_as_bytes_is_7bit_clean_whatever_the_text(text: str, html: str, subject: str) -> None:
    message = make_message(text=text, html=html, subject=" ".join(subject.split()) or "s")
    tree, flattened = written_by_the_email_package(message)
    assert message.as_bytes() == tree == flattened


def test_as_bytes_matches_for_several_recipients_long_headers_and_any_offset() -> None:
    message = make_message(
        recipients=("customer@example.com", "second.customer@example.org"),
        headers={"X-Ticket-ID": "TKT-1", "X-Long": "word " * 40 + "end"},
        date=datetime(2025, 11, 7, 7, 30, tzinfo=timezone(timedelta(hours=7))),
    )
    tree, flattened = written_by_the_email_package(message)
    assert message.as_bytes() == tree == flattened


def test_as_bytes_is_the_same_on_every_call_so_a_retry_sends_identical_bytes() -> None:
    message = make_message(date=datetime(2025, 1, 1, tzinfo=UTC))
    assert message.as_bytes() == message.as_bytes()


def test_as_bytes_parses_back_to_both_parts_unchanged() -> None:
    text, html = "Zeile 1 ✓\nline = two  \n", "<p>é & <b>x</b></p>"
    raw = make_message(text=text, html=html).as_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    plain = parsed.get_body(("plain",))
    rich = parsed.get_body(("html",))
    assert plain is not None and rich is not None
    assert plain.get_content().replace("\r\n", "\n") == text  # type: ignore[attr-defined]
    assert rich.get_content().replace("\r\n", "\n") == html + "\n"  # type: ignore[attr-defined]


def test_parsed_header_cache_stays_bounded_however_many_messages_are_built() -> None:
    """Every message adds headers never seen again (its boundary, its recipients): the
    registry's memory of parsed headers must not grow with them (nor keep old addresses)."""
    from gateway.transport import _POLICY, _ParsedHeaders

    registry = _POLICY.header_factory
    assert isinstance(registry, _ParsedHeaders)
    for n in range(3 * _ParsedHeaders.RECENT):
        long_to = tuple(f"customer{n}.{i}@example.com" for i in range(4))  # refolded: parsed
        make_message(recipients=long_to).as_bytes()
    assert len(registry._recent) <= _ParsedHeaders.RECENT
    assert len(registry._parsed) <= _ParsedHeaders.LIMIT
    assert not any("customer0." in value for _, value in registry._recent)


def test_each_part_reports_the_content_type_and_boundary_its_header_says() -> None:
    """The parts answer the generator from what they were built with, not by parsing their
    Content-Type header: those answers must be what parsing the written header gives."""
    built = make_message().to_mime()
    parsed = email.message_from_bytes(built.as_bytes(), policy=email.policy.default)
    pairs = list(zip(built.walk(), parsed.walk(), strict=True))
    assert [p.get_content_type() for _, p in pairs] == ["multipart/alternative", "text/plain", "text/html"]
    for ours, theirs in pairs:
        assert ours.get_content_type() == theirs.get_content_type()
        assert ours.get_content_maintype() == theirs.get_content_maintype()
        assert ours.get_content_subtype() == theirs.get_content_subtype()
        assert ours.get_boundary() == theirs.get_boundary()
    assert parsed.get_boundary() == built.get("Content-Type").params["boundary"]


def test_a_header_line_the_policy_would_refold_sends_the_message_through_the_email_package() -> None:
    """`as_bytes` writes the usual message itself; a header line over 78 characters (a long
    To) is refolded by the email package, which then writes the whole message. Both ways
    give the email package's bytes."""
    from gateway.transport import _written_headers

    long_to = make_message(recipients=tuple(f"customer{n}@example.com" for n in range(4)))
    usual = make_message()
    assert _written_headers(long_to._header_fields("b")) is None
    assert _written_headers(usual._header_fields("b")) is not None
    for message in (long_to, usual):
        tree, flattened = written_by_the_email_package(message)
        assert message.as_bytes() == tree == flattened
