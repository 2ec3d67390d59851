"""What a transport is: a small class that hands one finished message to a provider.

A transport receives an `OutgoingMessage` that is already rendered, addressed
and identified. It does not render, retry or record: the dispatcher does. It maps
its provider's answers onto the gateway's few statuses and its SDK's exceptions
onto `gateway.errors` in one place.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.generator import BytesGenerator
from email.header import Header
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import Any, ClassVar, Literal

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import PermanentDeliveryError

DeliveryStatus = Literal["queued", "sent", "delivered", "failed"]


@dataclass(frozen=True)
class OutgoingMessage:
    """One email, final: the same object (and the same Message-ID) on every retry."""

    delivery_id: str
    message_id: str
    sender: str
    recipients: tuple[str, ...]
    subject: str
    text: str
    html: str
    date: datetime
    headers: Mapping[str, str] = field(default_factory=dict)

    def to_mime(self) -> EmailMessage:
        """RFC 5322 multipart/alternative (text/plain + text/html), UTF-8."""
        boundary = self._boundary()
        msg = _KnownPart("multipart/alternative", boundary)
        for name, value in self._header_fields(boundary):
            # Set raw: the email package would parse each value into a header object and parse
            # it again to write it (bench/). A line over 78 characters is still refolded.
            msg.set_raw(name, value)
        msg.attach(_utf8_part("plain", self.text))
        msg.attach(_utf8_part("html", self.html))
        return msg

    def as_bytes(self) -> bytes:
        """The RFC 5322 bytes (CRLF line ends, 7-bit clean): identical on every call and retry,
        and to what the email package writes for `to_mime()` (tests/test_transport_bytes.py).

        Written here, in the email package's layout, without building the message tree: its
        generator walked the tree, cloned itself per part and asked each part about its type:
        a quarter of building a message in-process, a third under load (bench/). A header the
        email package would refold (a line over 78 characters) sends the message through the
        email package itself.
        """
        boundary = self._boundary()
        head = _written_headers(self._header_fields(boundary))
        if head is None:
            out = io.BytesIO()
            _LineEndingGenerator(out, mangle_from_=False, policy=_POLICY).flatten(self.to_mime())
            return out.getvalue()
        dash = f"--{boundary}"
        return "".join(
            (
                head,
                f"\r\n{dash}\r\n",
                _part_as_written("plain", self.text),
                f"\r\n{dash}\r\n",
                _part_as_written("html", self.html),
                f"\r\n{dash}--\r\n",
            )
        ).encode("ascii")

    def _header_fields(self, boundary: str) -> list[tuple[str, str]]:
        """The top-level headers in order, each checked by `_safe_header` and folded as written.

        The addresses were validated on the way in and are plain ASCII (`_safe_header`)."""
        fields = [
            ("From", _safe_header("From", self.sender, address=True)),
            ("To", _safe_header("To", ", ".join(self.recipients), address=True)),
            ("Subject", _text_header("Subject", self.subject)),
            ("Date", format_datetime(self.date)),
            ("Message-ID", _safe_header("Message-ID", self.message_id, address=True)),
        ]
        fields += [(name, _text_header(name, value)) for name, value in self.headers.items()]
        # Content-Type folded as the email package folds it (the line would be 84 characters).
        fields += [
            ("MIME-Version", "1.0"),
            ("Content-Type", f'multipart/alternative;\r\n boundary="{boundary}"'),
        ]
        return fields

    def _boundary(self) -> str:
        """Ours, the same on every retry: the generator would draw a random one and search both
        bodies for it. Quoted-printable text can never contain "==", so no search is needed."""
        return f"==============={hashlib.sha256(self.message_id.encode()).hexdigest()[:19]}=="


def _quoted_printable(text: str) -> str:
    """A text body, quoted-printable: 7-bit clean, readable, and encoded by binascii's C code
    (the email package's own encoder is pure Python, the largest cost of a send; bench/)."""
    body = text if text.endswith("\n") else text + "\n"
    return binascii.b2a_qp(body.encode("utf-8"), istext=True).decode("ascii")


def _part_headers(subtype: str) -> tuple[tuple[str, str], ...]:
    return (
        ("Content-Type", f'text/{subtype}; charset="utf-8"'),
        ("Content-Transfer-Encoding", "quoted-printable"),
    )


def _utf8_part(subtype: str, text: str) -> _KnownPart:
    part = _KnownPart(f"text/{subtype}")
    for name, value in _part_headers(subtype):
        part.set_raw(name, value)
    part.set_payload(_quoted_printable(text))
    return part


def _part_as_written(subtype: str, text: str) -> str:
    """A text part as the email package's generator writes `_utf8_part(subtype, text)`."""
    head = "".join(f"{name}: {value}\r\n" for name, value in _part_headers(subtype))
    return f"{head}\r\n{_crlf(_quoted_printable(text))}"


def _crlf(lines: str) -> str:
    """Every line end made CRLF, as the generator writes a body. Quoted-printable output has
    only "\\n" line ends unless the text had CRLF; for it a plain replace is ten times faster."""
    return _LINE_END.sub("\r\n", lines) if "\r" in lines else lines.replace("\n", "\r\n")


def _written_headers(fields: list[tuple[str, str]]) -> str | None:
    """The header lines as email.policy.SMTP writes raw values, or None where it would refold
    one (a line longer than 78 characters): only the email package can write that one."""
    written = []
    for name, value in fields:
        lines = value.splitlines()
        first_too_long = bool(lines) and len(name) + 2 + len(lines[0]) > _MAX_LINE
        if first_too_long or any(len(line) > _MAX_LINE for line in lines[1:]):
            return None
        written.append(f"{name}: " + "\r\n".join(lines) + "\r\n")
    return "".join(written)


class _KnownPart(EmailMessage):
    """A part whose Content-Type header we wrote, so it answers the generator's questions about
    it (asked six times per message) without parsing the header: a new boundary made every
    message's Content-Type a fresh parse, a fifth of writing it (bench/). The header itself
    is what gets written; tests/test_transport_bytes.py checks both agree."""

    def __init__(self, content_type: str, boundary: str | None = None) -> None:
        super().__init__(policy=_POLICY)
        self._content_type = content_type
        self._maintype, _, self._subtype = content_type.partition("/")
        self._boundary = boundary

    def get_content_type(self) -> str:
        return self._content_type

    def get_content_maintype(self) -> str:
        return self._maintype

    def get_content_subtype(self) -> str:
        return self._subtype

    def get_boundary(self, failobj: Any = None) -> Any:
        return self._boundary or failobj


class _LineEndingGenerator(BytesGenerator):
    """The email package's generator, turning a body's line ends into CRLF in one pass instead
    of two writes per line (a 15 kB HTML part is ~200 quoted-printable lines)."""

    def _write_lines(self, lines: str) -> None:
        if lines:
            # flatten() sets policy to the one it writes with; the base class splits on these ends
            assert self.policy is not None and self.policy.linesep == "\r\n"
            self.write(_crlf(lines))


class _ParsedHeaders(HeaderRegistry):
    """The email package's header registry, remembering what it built.

    The stock registry makes a new class for every header it parses, and every message
    repeats the same MIME headers (Content-Type, Content-Transfer-Encoding, MIME-Version,
    From). Parsed headers are immutable strings, so one instance serves every message;
    the bytes written are the same. Raw values are parsed each time they are read (a line
    too long to write as it is, read back by code that inspects a message), so the last few
    parsed are kept too. (Building MIME was a third of a send's CPU time.)
    """

    REPEATED = frozenset({"content-type", "content-transfer-encoding", "mime-version", "from"})
    LIMIT = 256
    RECENT = 32

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, Any] = {}
        self._parsed: dict[tuple[str, str], Any] = {}
        self._recent: dict[tuple[str, str], Any] = {}

    def __getitem__(self, name: str) -> Any:
        key = name.lower()
        if key not in self._classes:
            self._classes[key] = super().__getitem__(name)
        return self._classes[key]

    def __call__(self, name: str, value: str) -> Any:
        key = (name, value)
        header = self._parsed.get(key)
        if header is None:
            header = self._recent.get(key)
        if header is None:
            header = self[name](name, value)
            # A multipart boundary is new in every message: kept only among the recent.
            repeated = name.lower() in self.REPEATED and "boundary=" not in value
            if repeated and len(self._parsed) < self.LIMIT:
                self._parsed[key] = header
            else:
                if len(self._recent) >= self.RECENT:
                    self._recent.clear()
                self._recent[key] = header
        return header


#: the longest header line the policy writes as it is given (email.policy.SMTP's own limit)
_MAX_LINE = 78
#: email.policy.SMTP (CRLF, RFC 5322) with the remembering header registry
_POLICY = SMTP.clone(header_factory=_ParsedHeaders(), max_line_length=_MAX_LINE)


#: the line ends the email package recognises (email.generator.NLCRE)
_LINE_END = re.compile(r"\r\n|\r|\n")

#: what must never reach a header value: controls (CR/LF included), Unicode line separators
_UNSAFE_IN_HEADER = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u0085]")
_HEADER_NAME = re.compile(r"[!-9;-~]+")


def _safe_header(name: str, value: str, *, address: bool = False) -> str:
    """Refuse a header that could break out of its line or be rewritten by RFC 2047 decoding."""
    if not _HEADER_NAME.fullmatch(name):
        raise PermanentDeliveryError(f"{name!r} is not a valid header name")
    bad = _UNSAFE_IN_HEADER.search(value)
    if bad:
        raise PermanentDeliveryError(f"header {name} contains the control character U+{ord(bad.group()):04X}")
    if address and ("=?" in value or not value.isascii()):
        # email.policy.SMTP would turn these into encoded-words, which addresses may not hold.
        raise PermanentDeliveryError(f"header {name} must be plain ASCII addresses without '=?'")
    return value


def _text_header(name: str, value: str) -> str:
    """An unstructured header's value, folded here, so that recipients decode exactly `value`.

    Python's own folding is not used: it decodes encoded-words in a value it is
    given (CR/LF included: header injection), drops the space between two
    encoded-words of a long non-ASCII value, and may fold right after the colon
    (a leading space on read-back). Plain ASCII is folded at spaces; anything
    else becomes RFC 2047 encoded-words. Lines stay within 78 characters.
    """
    _safe_header(name, value)
    plain = value.isascii() and "=?" not in value and not value.startswith(" ")  # parsers strip a lead
    folded = _fold_at_spaces(name, value) if plain else None
    if folded is None:
        folded = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return folded


def _fold_at_spaces(name: str, value: str, limit: int = _MAX_LINE) -> str | None:
    """Fold before spaces (unfolding restores `value`); None when a word is too long for one line."""
    lines = [""]
    width = len(name) + 2
    for token in re.split(r"(?<=[^ ])(?= )", value):
        if lines[-1] and width + len(lines[-1]) + len(token) > limit:
            lines.append(token)
            width = 0
        else:
            lines[-1] += token
    if len(name) + 2 + len(lines[0]) > limit or any(len(line) > limit for line in lines[1:]):
        return None
    return "\r\n".join(lines)


@dataclass(frozen=True)
class Receipt:
    """What a provider answered when it took the message.

    `status` is `sent` (accepted, delivery still to be confirmed) or `delivered`.
    `provider_id` is the provider's reference, used later by `Transport.status`.
    """

    status: DeliveryStatus = "sent"
    provider_id: str | None = None


@dataclass(frozen=True)
class StatusUpdate:
    """A delivery confirmation: `sent` means not final yet (ask again after `retry_after`)."""

    status: DeliveryStatus
    error: str | None = None
    retry_after: float | None = None


class TransportSettings(BaseSettings):
    """Base for a transport's settings: the config block `transports.<name>`, overridden by
    the environment (`<NAME>_<FIELD>` unless the model sets its own `env_prefix`). Unknown keys
    are refused; secrets belong in `SecretStr` fields."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix="", case_sensitive=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over config.yaml, as everywhere else in the gateway.
        return (env_settings, init_settings)


class Transport:
    """Base class for transports. Subclasses set `name` and usually `settings_model`.

    Contract: `send` raises `TransientDeliveryError` or `PermanentDeliveryError`
    (never an SDK exception), `start` never waits for a server, `check` raises
    `DeliveryError` when the transport is not usable right now.
    """

    name: ClassVar[str] = ""
    settings_model: ClassVar[type[TransportSettings]] = TransportSettings
    #: True when `status` can confirm delivery after `send` returned `sent`.
    tracks_delivery: ClassVar[bool] = False

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    async def start(self) -> None:
        """Prepare clients or pools; must not wait for the provider to answer."""

    async def send(self, message: OutgoingMessage) -> Receipt:
        raise NotImplementedError

    async def status(self, receipt: Receipt) -> StatusUpdate:
        """Ask the provider what became of an accepted message."""
        return StatusUpdate(status=receipt.status)

    async def check(self) -> None:
        """Raise a `DeliveryError` when the transport is unusable now (for /readyz)."""

    async def aclose(self) -> None:
        """Release connections; called once at shutdown."""
