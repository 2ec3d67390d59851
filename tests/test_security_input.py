"""Hostile input cannot harm a recipient: it is refused naming the field, or it arrives inert.

Every case goes through the in-process escalation service (validation, rendering,
the store, the dispatcher, the file sink) and, when accepted, the `.eml` files
the file sink wrote are parsed back. A delivered message must have exactly the
headers of a normal one (nothing injected), the decoded values the caller gave,
and HTML with the same elements as a normal message (text is escaped, never
markup): no script, no `on*` attribute, no link but the configured ones.
A few cases also go through the real server, to see the tool error an agent gets.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from functools import partial
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.app import Gateway
from gateway.config import Settings, load_settings
from gateway.errors import InputError, TicketConflictError
from gateway.models import EscalationResult
from tests.support import SAMPLE_CALL, GatewayProcess, clean_env, deep_merge, parts, read_eml, write_config

#: hypothesis: a modest number of examples, always the same ones, no example database on disk
QUICK = settings(
    max_examples=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

#: the configured patterns allow anything: only the gateway's own checks stand between input and headers
PERMISSIVE = {"validation": {"ticket_id_pattern": ".+", "customer_id_pattern": ".+"}}
#: a long non-ASCII subject prefix for UC3's customer email, to exercise folding and encoding
THAI_PREFIX = "คำขอรับ คำปรึกษา ทางการเงิน ส่วนบุคคล จากที่ปรึกษา ของธนาคาร"
THAI_SUBJECT = {"use_cases": {"UC3": {"customer": {"wording": {"subject_prefix": THAI_PREFIX}}}}}


# -- reading HTML back ---------------------------------------------------------------------------------


class Page(HTMLParser):
    """Elements, attributes and text of an HTML body, as a mail client's parser sees them."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: Counter[str] = Counter()
        self.attributes: list[tuple[str, str, str | None]] = []
        self.chunks: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements[tag] += 1
        self.attributes.extend((tag, name, value) for name, value in attrs)

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)

    def handle_comment(self, data: str) -> None:
        self.elements["<!-- -->"] += 1

    def handle_decl(self, decl: str) -> None:
        self.elements["<!decl>"] += 1

    def handle_pi(self, data: str) -> None:
        self.elements["<?pi>"] += 1

    def unknown_decl(self, data: str) -> None:
        self.elements["<![unknown]>"] += 1

    @property
    def structure(self) -> Counter[str]:
        """Every element but <br>, which each line break of query and reason adds."""
        return Counter({tag: n for tag, n in self.elements.items() if tag != "br"})

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def values(self, attribute: str) -> list[str]:
        return [value or "" for _, name, value in self.attributes if name == attribute]


# -- the harness: one in-process gateway per configuration, driven from sync (hypothesis) tests --------


@dataclass
class Baseline:
    """What a normal message of one (use case, role) looks like."""

    headers: list[str]
    subject: str
    ticket_id: str
    structure: Counter[str]
    srcs: list[str]


@dataclass
class Harness:
    portal: BlockingPortal
    gateway: Gateway
    outbox: Path
    baselines: dict[tuple[str, str], Baseline] = field(default_factory=dict)
    sequence: int = 0

    @property
    def settings(self) -> Settings:
        return self.gateway.settings

    def send(self, **call: Any) -> EscalationResult:
        return self.portal.call(partial(self.gateway.service.sendemail, **{**SAMPLE_CALL, **call}))

    def unique_ticket(self) -> str:
        self.sequence += 1
        return f"TKT-2025-{self.sequence:06d}"

    def message(self, message_id: str) -> EmailMessage:
        delivery_id = message_id.strip("<>").split("@", 1)[0]
        return read_eml(self.outbox / f"{delivery_id}.eml")

    def record_baselines(self) -> None:
        for use_case in self.settings.use_cases:
            ticket = f"TKT-BASELINE-{use_case}"
            result = self.send(ticket_id=ticket, use_case=use_case)
            for delivery in result.deliveries:
                message = self.message(delivery.message_id)
                page = Page(parts(message)[1])
                self.baselines[(use_case, delivery.role)] = Baseline(
                    headers=list(message.keys()),
                    subject=str(message["Subject"]),
                    ticket_id=ticket,
                    structure=page.structure,
                    srcs=page.values("src"),
                )


def start_harness(
    directory: Path, patch: dict[str, Any], *, baselines: bool = True
) -> Generator[Harness, None, None]:
    patch = deep_merge({"email": {"per_recipient_hourly_cap": 1_000_000}}, patch)
    gateway = Gateway(load_settings(write_config(directory, patch), env=clean_env()))
    with (
        start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(gateway.running(background=False)),
    ):
        harness = Harness(portal, gateway, directory / "outbox")
        if baselines:
            harness.record_baselines()
        yield harness


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """The shipped configuration: default id patterns and length caps."""
    yield from start_harness(tmp_path_factory.mktemp("default"), {})


@pytest.fixture(scope="module")
def permissive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """Id patterns that allow anything, and a long Thai subject for UC3's customer email."""
    yield from start_harness(tmp_path_factory.mktemp("permissive"), deep_merge(PERMISSIVE, THAI_SUBJECT))


# -- the two acceptable outcomes -----------------------------------------------------------------------


def cleaned_text(value: str) -> str:
    """What the gateway promises to keep of free text: line breaks as LF, NFC, no outer blank lines."""
    return unicodedata.normalize("NFC", value.replace("\r\n", "\n").replace("\r", "\n")).strip("\n")


def configured_links(settings: Settings, ticket_id: str, customer_id: str, use_case: str) -> set[str]:
    values = {
        "ticket_id": quote(ticket_id, safe=""),
        "customer_id": quote(customer_id, safe=""),
        "use_case": quote(use_case, safe=""),
    }
    return {settings.links.tracking_url.format(**values), settings.links.dashboard_url.format(**values)}


def assert_refused(error: InputError, fields: set[str], call: dict[str, Any]) -> None:
    """A clear error: it names one of the fields that may be wrong, and never echoes the address."""
    assert error.field in fields, f"{error.field!r} refused, expected one of {fields}: {error}"
    assert str(error).startswith(error.field) or f"{error.field} " in str(error), str(error)
    address = call.get("customer_email", "")
    if isinstance(address, str) and re.fullmatch(r"[^@]+@[^@]+", address.strip()):
        assert address.strip() not in str(error), "the error message echoes the customer's address"


def assert_delivered_safely(harness: Harness, call: dict[str, Any], result: EscalationResult) -> None:
    ticket = call["ticket_id"].strip()
    customer_id = call["customer_id"].strip()
    use_case = call["use_case"].strip().upper()
    query, reason = cleaned_text(call["query"]), cleaned_text(call["reason"])
    assert result.status == "sent", result
    local, _, domain = call["customer_email"].strip().rpartition("@")
    assert result.recipients.customer.rpartition("@")[0] == local, "the address was rewritten"
    if domain.isascii():
        assert result.recipients.customer.rpartition("@")[2] == domain.lower()
    links = configured_links(harness.settings, ticket, customer_id, use_case)

    for delivery in result.deliveries:
        baseline = harness.baselines[(use_case, delivery.role)]
        message = harness.message(delivery.message_id)
        assert list(message.keys()) == baseline.headers, "a header was injected or lost"
        expected_to = (
            result.recipients.customer if delivery.role == "customer" else result.recipients.bank_team
        )
        assert [a.addr_spec for a in message["To"].addresses] == [expected_to]
        assert str(message["X-Ticket-ID"]) == ticket
        expected_subject = " ".join(baseline.subject.replace(baseline.ticket_id, ticket).split())
        assert str(message["Subject"]) == expected_subject

        text, html = parts(message)
        text = text.replace("\r\n", "\n")
        page = Page(html)
        assert page.structure == baseline.structure, "input added or removed HTML elements"
        assert "script" not in page.elements
        for tag, name, value in page.attributes:
            assert not name.startswith("on"), f"event handler attribute {name} on <{tag}>"
            squeezed = re.sub(r"[\s\x00-\x1f]", "", value or "").lower()
            assert not squeezed.startswith(("javascript:", "vbscript:", "data:")), f"{name}={value!r}"
        hrefs = page.values("href")
        assert hrefs and set(hrefs) <= links, f"unexpected links {set(hrefs) - links}"
        assert page.values("src") == baseline.srcs

        # The text arrives as text: whole in the plain part, line by line in the HTML.
        shown = [query] + ([reason, customer_id] if delivery.role == "bank_team" else [])
        for value in shown:
            assert value in text
            for line in value.split("\n"):
                assert line in page.text


def outcome(harness: Harness, fields: set[str], **call: Any) -> str:
    """Send one escalation; check it was refused properly or delivered safely; say which."""
    call = {**SAMPLE_CALL, **call}
    try:
        result = harness.send(**call)
    except TicketConflictError:
        return "conflict"  # a random ticket id met again with other content: refused, nothing sent
    except InputError as error:
        assert_refused(error, fields, call)
        return "refused"
    if result.replay:
        return "replay"
    assert_delivered_safely(harness, call, result)
    return "sent"


# -- known payloads in free text: they arrive, as text -------------------------------------------------

LONG_LINE = "A" * 3990
PAYLOADS = {
    "script-tag": "<script>alert(document.cookie)</script>",
    "img-onerror": '"><img src=x onerror=alert(1)>',
    "attribute-breakout": "' onmouseover='alert(1)' x='",
    "javascript-url": "javascript:alert(1)",
    "anchor": '<a href="javascript:alert(1)">Click to verify your account</a>',
    "svg-onload": "<svg/onload=alert(1)>",
    "style": "<style>body{display:none}</style>",
    "form": "</td></tr></table><form action=https://evil.example><input name=pin></form>",
    "comment-and-cdata": "<!-- --> <![CDATA[ x ]]> <?php echo 1; ?>",
    "entities": "&lt;b&gt; &amp;amp; &#60;script&#62; &#x3C;",
    "template": "{{ 7*7 }} {% for x in range(9) %}{{ x }}{% endfor %} ${7*7} <%= 7*7 %>",
    "sql": "'; DROP TABLE escalations; -- 1' OR '1'='1",
    "header-crlf": "hello\r\nBcc: evil@evil.example\r\nSubject: pwned",
    "encoded-word": "=?utf-8?q?=0D=0ABcc:_evil@evil.example?=",
    "mime-boundary": "x\n--===============0000000000==\nContent-Type: text/html\n\n<script>x</script>",
    "line-endings": "one\ntwo\r\nthree\rfour\n\n\nfive",
    "tabs-and-indent": "\tcolumn\tcolumn\n    indented",
    "thai": "ดอกเบี้ยเงินกู้บ้านเท่าไร และมีค่าธรรมเนียมอะไรบ้าง",
    "arabic-rtl-text": "ما هو سعر الفائدة على القروض العقارية؟",
    "emoji-and-combining": "💸🏦 e\u0301 \uff26\uff55\uff4c\uff4c (fullwidth)",
    "long-line": LONG_LINE,
    "url-encoded-crlf": "%0d%0aBcc:%20evil@evil.example",
}


@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_hostile_query_arrives_as_escaped_text(default: Harness, payload: str) -> None:
    assert outcome(default, {"query"}, ticket_id=default.unique_ticket(), query=payload) == "sent"


@pytest.mark.parametrize(
    "payload",
    [p for p in PAYLOADS.values() if len(p) <= 500],
    ids=[k for k, p in PAYLOADS.items() if len(p) <= 500],
)
def test_hostile_reason_arrives_as_escaped_text(default: Harness, payload: str) -> None:
    assert outcome(default, {"reason"}, ticket_id=default.unique_ticket(), reason=payload) == "sent"


ID_PAYLOADS = {
    "script-tag": "<script>alert(1)</script>",
    "img-onerror": '"><img src=x onerror=alert(1)>',
    "javascript-url": "javascript:alert(1)",
    "path-traversal": "../../admin/tickets/1",
    "query-and-fragment": "TKT?next=https://evil.example&x=1#frag",
    "percent-encoded-crlf": "TKT%0d%0aBcc:%20evil@evil.example",
    "quotes": "TKT\"'`",
    "spaces": "TKT 2025  001234",
    "thai": "TKT-ไทย-001",
    "sql": "1' OR '1'='1",
    "address-like": "evil@evil.example",
}


@pytest.mark.parametrize("payload", list(ID_PAYLOADS.values()), ids=list(ID_PAYLOADS))
def test_hostile_ids_allowed_by_a_permissive_pattern_arrive_inert(permissive: Harness, payload: str) -> None:
    for use_case in ("UC2", "UC3"):
        ticket = f"{payload}-{permissive.unique_ticket()}-{use_case}"
        got = outcome(
            permissive,
            set(),
            ticket_id=ticket,
            customer_id=payload,
            use_case=use_case,
            query=PAYLOADS["anchor"],
        )
        assert got == "sent"


@pytest.mark.parametrize("payload", list(ID_PAYLOADS.values()), ids=list(ID_PAYLOADS))
def test_hostile_ids_are_refused_by_the_default_pattern(default: Harness, payload: str) -> None:
    with pytest.raises(InputError) as refused:
        default.send(ticket_id=payload)
    assert refused.value.field == "ticket_id"
    assert "must match" in str(refused.value) and "TKT-2025-001234" in str(refused.value)
    with pytest.raises(InputError) as refused:
        default.send(ticket_id=default.unique_ticket(), customer_id=payload)
    assert refused.value.field == "customer_id"


def test_long_non_ascii_subject_is_folded_and_decodes_exactly(permissive: Harness) -> None:
    ticket = "ไทย " * 10 + permissive.unique_ticket()  # a mix that CPython's own folding garbles
    result = permissive.send(ticket_id=ticket, use_case="UC3")
    customer = next(d for d in result.deliveries if d.role == "customer")
    raw = (permissive.outbox / f"{customer.message_id.strip('<>').split('@')[0]}.eml").read_bytes()
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii(), "headers must be 7-bit: non-ASCII goes in RFC 2047 encoded-words"
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert str(permissive.message(customer.message_id)["Subject"]) == f"{THAI_PREFIX}: {ticket}"
    assert outcome(permissive, set(), ticket_id=f"{ticket}-again", use_case="UC3") == "sent"


# -- known payloads that must be refused, each naming its field and what is allowed ---------------------

REFUSED = [
    # (field, value, words the message must hold)
    ("customer_email", "not-an-address", ["customer_email", "not a valid email address"]),
    ("customer_email", "jane.doe@@example.com", ["customer_email", "not a valid email address"]),
    ("customer_email", "jane.doe@example", ["customer_email", "period"]),
    ("customer_email", "Jane Doe <jane.doe@example.com>", ["customer_email", "display name"]),
    ("customer_email", "jane.doe@example.com\r\nBcc: evil@evil.example", ["customer_email", "U+000D"]),
    ("customer_email", "jane.doe@example.com, evil@evil.example", ["customer_email", "invalid characters"]),
    ("customer_email", "jane.doe@example.com\u202e", ["customer_email", "RIGHT-TO-LEFT OVERRIDE"]),
    ("customer_email", "jane.doe@example.com\x00", ["customer_email", "U+0000"]),
    ("customer_email", "=?utf-8?q?evil=40evil.example?=@example.com", ["customer_email", "encoded-word"]),
    ("customer_email", "jäne@example.com", ["customer_email", "Internationalized characters"]),
    ("customer_email", "j" * 65 + "@example.com", ["customer_email", "too long"]),
    ("customer_email", "jane@[127.0.0.1]", ["customer_email", "bracketed IP"]),
    ("customer_email", "", ["customer_email", "required", "customer@example.com"]),
    ("ticket_id", "", ["ticket_id", "required", "TKT-2025-001234"]),
    ("ticket_id", "TKT 2025", ["ticket_id", "must match", "TKT-2025-001234"]),
    ("ticket_id", "T" * 65, ["ticket_id", "must match"]),
    ("ticket_id", "T" * 300, ["ticket_id", "limit is 256"]),
    ("ticket_id", "TKT-1\r\nBcc: evil@evil.example", ["ticket_id", "U+000D", "one line"]),
    ("ticket_id", "=?utf-8?q?TKT?=", ["ticket_id", "encoded-word"]),
    ("customer_id", "   ", ["customer_id", "required", "CUST-001"]),
    ("customer_id", "CUST/../1", ["customer_id", "must match"]),
    ("use_case", "UC9", ["use_case", "use one of: UC2, UC3"]),
    ("use_case", "", ["use_case", "UC2, UC3"]),
    ("use_case", "<script>", ["use_case", "UC2, UC3"]),
    ("query", "", ["query", "required"]),
    ("query", " \n\t ", ["query", "required"]),
    ("query", "x" * 4001, ["query", "4001 characters", "limit is 4000"]),
    ("query", "nul \x00 byte", ["query", "U+0000", "line breaks and tabs are allowed"]),
    ("query", "bell \x07", ["query", "U+0007"]),
    ("query", "escape \x1b[2J", ["query", "U+001B"]),
    ("query", "form feed \x0c", ["query", "U+000C"]),
    ("query", "vertical tab \x0b", ["query", "U+000B"]),
    ("query", "next line \x85", ["query", "U+0085"]),
    ("query", "line separator \u2028 x", ["query", "U+2028"]),
    ("query", "paragraph separator \u2029 x", ["query", "U+2029"]),
    ("query", "override \u202e txt.exe", ["query", "U+202E"]),
    ("query", "embedding \u202a x", ["query", "U+202A"]),
    ("query", "isolate \u2066 x \u2069", ["query", "U+2066"]),
    ("query", "pop isolate \u2069", ["query", "U+2069"]),
    ("query", "byte order mark \ufeff", ["query", "U+FEFF"]),
    ("query", "lone surrogate \ud800", ["query", "U+D800"]),
    ("reason", "r" * 501, ["reason", "501 characters", "limit is 500"]),
    ("reason", "override \u202d", ["reason", "U+202D"]),
    ("reason", "nul \x00", ["reason", "U+0000"]),
]


@pytest.mark.parametrize(
    ("field_name", "value", "words"), REFUSED, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(REFUSED)]
)
def test_bad_input_is_refused_naming_the_field_and_what_is_allowed(
    default: Harness, field_name: str, value: str, words: list[str]
) -> None:
    call = {**SAMPLE_CALL, "ticket_id": default.unique_ticket(), field_name: value}
    with pytest.raises(InputError) as refused:
        default.send(**call)
    message = str(refused.value)
    assert refused.value.field == field_name
    for word in words:
        assert word in message
    assert_refused(refused.value, {field_name}, call)


def test_permissive_patterns_still_refuse_what_would_reach_a_header(permissive: Harness) -> None:
    for value, words in [
        ("TKT-1\r\nBcc: evil@evil.example", ["U+000D", "one line"]),
        ("TKT-1\nX-Evil: 1", ["U+000A"]),
        ("TKT-1\u2028X-Evil: 1", ["U+2028"]),
        ("TKT-1\u202e", ["U+202E"]),
        ("TKT-1\t2", ["U+0009"]),
        ("=?utf-8?q?=0D=0ABcc:_evil@evil.example?=", ["'=?'", "encoded-word"]),
        ("TKT =?utf-8?b?QmNjOiBldmlsQGV2aWwuZXhhbXBsZQ==?=", ["encoded-word"]),
    ]:
        for field_name in ("ticket_id", "customer_id"):
            call = {"ticket_id": permissive.unique_ticket(), field_name: value}
            with pytest.raises(InputError) as refused:
                permissive.send(**call)
            assert refused.value.field == field_name
            for word in [field_name, *words]:
                assert word in str(refused.value)


def test_patterns_and_caps_come_from_configuration(tmp_path: Path) -> None:
    patch = {
        "validation": {
            "ticket_id_pattern": r"^CASE-\d{4}$",
            "customer_id_pattern": r"^C\d+$",
            "query_max_chars": 10,
            "reason_max_chars": 5,
        }
    }
    harness_iter = start_harness(tmp_path, patch, baselines=False)
    harness = next(harness_iter)
    try:
        good = {"ticket_id": "CASE-0001", "customer_id": "C1", "query": "0123456789", "reason": "short"}
        assert harness.send(**good).status == "sent"
        for field_name, value, words in [
            ("ticket_id", "TKT-2025-001234", [r"^CASE-\d{4}$"]),
            ("customer_id", "CUST-001", [r"^C\d+$"]),
            ("query", "0123456789x", ["limit is 10"]),
            ("reason", "longer", ["limit is 5"]),
        ]:
            with pytest.raises(InputError) as refused:
                harness.send(**{**good, "ticket_id": "CASE-0002", field_name: value})
            assert refused.value.field == field_name
            assert all(word in str(refused.value) for word in words)
            assert "TKT-2025-001234 " not in str(refused.value).replace(
                ")", " "
            )  # no example the pattern refuses
    finally:
        harness_iter.close()


def test_addresses_are_checked_without_dns(default: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A domain that exists nowhere is accepted: syntax only, no look-up (any look-up would fail here)."""
    import socket

    def no_network(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("address validation tried the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    address = "jane.doe@no-such-domain-7f3a9c1e.example.com"
    result = default.send(ticket_id=default.unique_ticket(), customer_email=address)
    assert result.recipients.customer == address


def test_internationalized_domain_is_sent_in_its_ascii_form(default: Harness) -> None:
    call = {"ticket_id": default.unique_ticket(), "customer_email": "jane@exämple.com"}
    result = default.send(**call)
    assert result.recipients.customer == "jane@xn--exmple-cua.com"
    customer = next(d for d in result.deliveries if d.role == "customer")
    assert str(default.message(customer.message_id)["To"]) == "jane@xn--exmple-cua.com"


# -- hypothesis: arbitrary input, the same two outcomes ------------------------------------------------

#: characters the gateway refuses in free text (and, with tab and newlines, in identifiers)
REFUSED_CHARACTERS = [
    "\u2028",
    "\u2029",
    "\u202e",
    "\u2067",
    "\x00",
    "\x1b",
    "\x85",
    "\ufeff",
    "\ud83d",
    "\x0b",
]
#: markup, entities and line breaks: accepted in free text, and must arrive as text
MARKUP = [p for p in PAYLOADS.values() if len(p) < 200] + [
    "\r\n",
    "\n",
    "\r",
    "\t",
    "&",
    "<",
    ">",
    '"',
    "'",
    "\u0301",
]
#: what a permissive id pattern lets through and must still arrive inert
ID_MARKUP = [
    "<script>", "<", ">", '"', "'", "`", "&", " ", "/../", "%0d%0a", "?x=1&y=2", "#frag", "javascript:",
    "ไทย", "@", "Ω", "\u0301", "(", ")", ";",
]  # fmt: skip
#: what must be refused in an id whatever the pattern
ID_REFUSED = [
    "\r\n",
    "\n",
    "\t",
    "\u2028",
    "\u202e",
    "\x00",
    "=?",
    "=?utf-8?b?DQpCY2M6IGV2aWxAZXZpbC5leGFtcGxl?=",
]

printable = st.text(st.characters(exclude_categories=["C"]), max_size=30)
anything = st.text(st.characters(exclude_categories=()), max_size=30)  # controls and lone surrogates too
deliverable_text = st.lists(st.one_of(printable, st.sampled_from(MARKUP)), min_size=1, max_size=6).map(
    "".join
)
hostile_text = st.one_of(
    *[deliverable_text] * 5,
    st.lists(
        st.one_of(deliverable_text, anything, st.sampled_from(REFUSED_CHARACTERS)), min_size=2, max_size=4
    ).map("".join),
)
alnum = st.from_regex(r"[A-Za-z0-9-]{1,8}", fullmatch=True)
deliverable_id = st.lists(st.one_of(alnum, st.sampled_from(ID_MARKUP)), min_size=1, max_size=5).map("".join)
hostile_id = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
    deliverable_id,
    deliverable_id,
    st.lists(st.one_of(deliverable_id, anything, st.sampled_from(ID_REFUSED)), min_size=2, max_size=4).map(
        "".join
    ),
)
atext = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,20}", fullmatch=True)
good_domains = st.sampled_from(
    ["example.com", "Example.ORG", "bankx.com", "exämple.com", "mail.example.co.th"]
)
bad_domains = st.sampled_from(
    ["example..com", "-bad.com", "localhost", "[10.0.0.1]", "example.com.", "ex ample.com"]
)
hostile_email = st.one_of(
    st.emails(),
    st.builds(lambda local, domain: f"{local}@{domain}", atext, good_domains),
    st.builds(lambda local, domain: f"{local}@{domain}", atext, good_domains),
    st.builds(lambda local, domain: f"{local}@{domain}", atext, bad_domains),
    st.builds(
        lambda local, fragment, domain: f"{local}{fragment}@{domain}",
        atext,
        st.sampled_from(ID_MARKUP + ID_REFUSED),
        good_domains,
    ),
    anything,
)


def test_arbitrary_query_and_reason_are_refused_or_arrive_as_text(default: Harness) -> None:
    seen: Counter[str] = Counter()

    @settings(QUICK, max_examples=60)
    @given(query=hostile_text, reason=hostile_text)
    def check(query: str, reason: str) -> None:
        seen[
            outcome(
                default, {"query", "reason"}, ticket_id=default.unique_ticket(), query=query, reason=reason
            )
        ] += 1

    check()
    assert seen["sent"] >= 15 and seen["refused"] >= 5, seen


@pytest.mark.parametrize("harness_name", ["default", "permissive"])
def test_arbitrary_ids_and_addresses_are_refused_or_arrive_inert(
    harness_name: str, request: pytest.FixtureRequest
) -> None:
    harness: Harness = request.getfixturevalue(harness_name)
    seen: Counter[str] = Counter()
    fields = {"ticket_id", "customer_id", "customer_email"}

    @settings(QUICK, max_examples=60)
    @given(
        ticket_id=hostile_id,
        customer_id=hostile_id,
        customer_email=hostile_email,
        use_case=st.sampled_from(["UC2", "UC3", "uc2", " UC3 "]),
    )
    def check(ticket_id: str, customer_id: str, customer_email: str, use_case: str) -> None:
        call = {"ticket_id": ticket_id, "customer_id": customer_id, "customer_email": customer_email}
        seen[outcome(harness, fields, use_case=use_case, **call)] += 1

    check()
    assert seen["sent"] >= 5 and seen["refused"] >= 10, seen


# -- through the real server: what an agent sees ------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with GatewayProcess(write_config(tmp_path_factory.mktemp("server"))) as gateway:
        yield gateway


@pytest.mark.anyio
async def test_tool_errors_name_the_field_and_never_echo_the_address(server: GatewayProcess) -> None:
    cases = [
        ("customer_email", "private.person.1@@example.com"),
        ("customer_email", "Private Person <private.person.2@example.com>"),
        ("customer_email", "=?utf-8?q?x?=private.person.3@example.com"),
        ("ticket_id", "<script>alert(1)</script>"),
        ("use_case", "UC9"),
        ("query", "override \u202e"),
        ("reason", "r" * 501),
    ]
    async with (
        httpx2.AsyncClient(timeout=30) as http,
        Client(streamable_http_client(server.mcp_url, http_client=http)) as client,
    ):
        for field_name, value in cases:
            result = await client.call_tool("sendemail", {**SAMPLE_CALL, field_name: value})
            assert result.is_error, (field_name, value)
            message = result.content[0].text  # type: ignore[union-attr]
            assert field_name in message
            if field_name == "customer_email":
                assert value not in message
                assert "private.person" not in message
        accepted = await client.call_tool("sendemail", {**SAMPLE_CALL, "query": PAYLOADS["img-onerror"]})
        assert not accepted.is_error and accepted.structured_content is not None
        assert accepted.structured_content["status"] == "sent"
    logs = server.logs()
    assert "Tool 'sendemail' failed" in logs  # the SDK does log tool errors, at INFO
    assert "private.person" not in logs
