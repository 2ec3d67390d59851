"""The SMTP transport: aiosmtplib over a small pool of persistent connections.

One send is one SMTP transaction on a pooled connection: MAIL, one RCPT per
recipient, DATA. If any recipient is refused the transaction is reset before
DATA, so a message is either taken for every recipient or for none. A pooled
connection the server has dropped meanwhile (idle timeout, restart) is noticed at
MAIL or RCPT and the send is repeated once on a fresh connection; nothing is ever
repeated once DATA has started, since the server may already have the message.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiosmtplib import (
    SMTP,
    SMTPDataError,
    SMTPHeloError,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPStatus,
)
from aiosmtplib.email import parse_address

from gateway.errors import PermanentDeliveryError, TransientDeliveryError
from gateway.logs import mask_address
from gateway.transport import OutgoingMessage, Receipt, Transport
from gateway_smtp.errors import MAPPED, RecipientsRefused, Scrubber, delivery_error
from gateway_smtp.pool import Connection, ConnectionPool, Lease, PoolClosed
from gateway_smtp.settings import SMTPSettings

log = logging.getLogger("gateway_smtp")

#: /readyz while every connection is busy: ready if a send succeeded this recently (seconds)
BUSY_POOL_GRACE_SECONDS = 30.0
#: how long shutdown waits for each idle connection's QUIT
QUIT_TIMEOUT_SECONDS = 1.0
#: any line end, as DATA needs them all to be CRLF
_LINE_END = re.compile(rb"\r\n|\n|\r")


@dataclass(frozen=True)
class Envelope:
    """What goes on the wire for one message: checked addresses, and the RFC 5322 bytes as they
    follow DATA (made before a pooled connection is taken, not while it waits) with their size."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    size: int  # of the message itself, for SIZE= (RFC 1870)

    @property
    def mail_from(self) -> bytes:
        """MAIL's argument. The address is a checked bare addr-spec (`_plain_address`), so this is
        what aiosmtplib's `mail()` would write, without parsing the address once more."""
        return b"FROM:<" + self.sender.encode("ascii") + b">"


class Step:
    """Where in the SMTP exchange a send is, so a failure can be judged (and retried) correctly."""

    def __init__(self) -> None:
        self.name = "connect"


class SMTPTransport(Transport):
    name = "smtp"
    settings_model = SMTPSettings

    def __init__(self, settings: SMTPSettings) -> None:
        super().__init__(settings)
        self.settings: SMTPSettings = settings
        self.server = settings.address
        self._tls = settings.tls_context()
        self._pool = ConnectionPool(
            settings.pool_size, settings.idle_timeout_seconds, settings.max_messages_per_connection
        )
        self._password = settings.password.get_secret_value() if settings.password else None
        self._ehlo_name = settings.local_hostname
        self._last_ok = float("-inf")

    async def start(self) -> None:
        # No connection here: start-up never waits for a mail server.
        plain = self.settings.security == "none"
        if self._password is not None and plain and not _loopback(self.settings.host):
            log.warning(
                "SMTP AUTH to %s over an unencrypted connection: the password crosses the network "
                "in clear; set SMTP_SECURITY=starttls or tls",
                self.server,
            )

    async def send(self, message: OutgoingMessage) -> Receipt:
        envelope = self._envelope(message)
        scrub = Scrubber(envelope.recipients, [self._password] if self._password else [])
        async with self._lease() as lease:
            while True:
                may_retry = lease.reused
                step = Step()
                try:
                    reply = await self._send_on(lease, envelope, step)
                except MAPPED as err:
                    if may_retry and step.name in ("mail", "rcpt") and _connection_died(err):
                        # The server closed this pooled connection while it was idle. Nothing
                        # was accepted yet (no DATA), so the same message goes on a fresh one.
                        log.debug("server closed a pooled SMTP connection to %s; reconnecting", self.server)
                        lease.discard()
                        continue
                    raise delivery_error(err, server=self.server, step=step.name, scrub=scrub) from err
                return Receipt(status="sent", provider_id=scrub(reply) or None)

    async def check(self) -> None:
        """Prove the server takes a session now: NOOP on an idle pooled connection, or open one."""
        if self._pool.saturated and time.monotonic() - self._last_ok < BUSY_POOL_GRACE_SECONDS:
            return  # every connection is busy sending, and sends succeed
        timeout = self.settings.check_timeout_seconds
        scrub = Scrubber(secrets=[self._password] if self._password else [])
        try:
            async with asyncio.timeout(timeout), self._lease() as lease:
                if lease.connection is not None and await self._noop(lease, timeout, quiet=True):
                    return
                await self._open(lease, timeout)
                await self._noop(lease, timeout, quiet=False)
        except MAPPED as err:
            raise delivery_error(err, server=self.server, step="check", scrub=scrub) from err

    async def aclose(self) -> None:
        await self._pool.aclose(min(QUIT_TIMEOUT_SECONDS, self.settings.command_timeout_seconds))

    # -- one exchange ----------------------------------------------------------------------------

    @asynccontextmanager
    async def _lease(self) -> AsyncIterator[Lease]:
        try:
            async with self._pool.lease() as lease:
                yield lease
        except PoolClosed as err:
            raise TransientDeliveryError(f"the SMTP transport to {self.server} is shut down") from err

    async def _send_on(self, lease: Lease, envelope: Envelope, step: Step) -> str:
        connection = lease.connection or await self._open(lease, self.settings.connect_timeout_seconds)
        try:
            reply_wait = self.settings.command_timeout_seconds
            reply = await _transaction(connection.client, envelope, reply_wait, step)
        except (SMTPResponseException, RecipientsRefused):
            # The server answered: the session is in a known state (reset) unless it hung up.
            if not connection.is_open:
                lease.discard()
            raise
        except BaseException:
            # Disconnect, timeout, cancellation: a reply may still be in flight, so commands
            # and replies could pair up wrongly on this session. Never reuse it.
            lease.discard()
            raise
        connection.messages += 1
        lease.used()
        self._last_ok = time.monotonic()
        return reply

    async def _open(self, lease: Lease, connect_wait: float) -> Connection:
        security = self.settings.security
        client = SMTP(
            hostname=self.settings.host,
            port=self.settings.port,
            local_hostname=await self._local_hostname(),
            timeout=self.settings.command_timeout_seconds,
            use_tls=security == "tls",
            start_tls=security == "starttls",  # never an opportunistic upgrade: "none" means none
            tls_context=self._tls,
            username=self.settings.username,
            password=self._password,
        )
        await client.connect(timeout=connect_wait)  # TCP, TLS, greeting; then STARTTLS and AUTH
        if client.is_ehlo_or_helo_needed:
            # Now rather than inside MAIL: the first message on a connection must see the
            # server's extensions too (SIZE), and a server refusing EHLO fails as it connects.
            try:
                await client.ehlo(timeout=connect_wait)
            except SMTPHeloError:
                await client.helo(timeout=connect_wait)  # a server from before ESMTP
        log.debug("opened SMTP connection to %s (%s)", self.server, security)
        return lease.attach(client)

    async def _noop(self, lease: Lease, reply_wait: float, *, quiet: bool) -> bool:
        """NOOP on the held connection; with `quiet`, a failure just discards it (it was stale)."""
        assert lease.connection is not None
        try:
            await lease.connection.client.noop(timeout=reply_wait)
        except BaseException as err:
            lease.discard()
            if quiet and isinstance(err, MAPPED):
                return False
            raise
        lease.used()
        self._last_ok = time.monotonic()
        return True

    async def _local_hostname(self) -> str:
        if self._ehlo_name is None:
            # aiosmtplib would look it up for every new connection; once is enough.
            self._ehlo_name = await asyncio.to_thread(socket.getfqdn)
        return self._ehlo_name

    def _envelope(self, message: OutgoingMessage) -> Envelope:
        sender = _plain_address(message.sender, "sender")
        recipients = tuple(_plain_address(r, "recipient") for r in message.recipients)
        if not recipients:
            raise PermanentDeliveryError("the message has no recipients")
        try:
            payload = message.as_bytes()  # 7-bit clean: quoted-printable bodies, encoded-word headers
        except ValueError as err:
            raise PermanentDeliveryError(f"the message cannot be written as MIME: {err}") from err
        return Envelope(sender=sender, recipients=recipients, data=data_lines(payload), size=len(payload))


async def _transaction(client: SMTP, envelope: Envelope, reply_wait: float, step: Step) -> str:
    """MAIL, RCPT for each recipient, DATA; returns the server's reply to the message."""
    step.name = "mail"
    options = [b"SIZE=%d" % envelope.size] if client.supports_extension("size") else []
    try:
        async with _reply_within(reply_wait):
            accepted = await client.execute_command(b"MAIL", envelope.mail_from, *options, timeout=None)
        if accepted.code != SMTPStatus.completed:
            raise SMTPSenderRefused(accepted.code, accepted.message, envelope.sender)
        step.name = "rcpt"
        refused: dict[str, tuple[int, str]] = {}
        for recipient in envelope.recipients:
            async with _reply_within(reply_wait):
                reply = await client.execute_command(b"RCPT", _rcpt_to(recipient), timeout=None)
            if reply.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
                refused[recipient] = (reply.code, reply.message)
        if refused:
            # aiosmtplib's sendmail would send DATA to the accepted ones and report success.
            raise RecipientsRefused(refused, len(envelope.recipients))
        step.name = "data"
        async with _reply_within(reply_wait):
            go_ahead = await client.execute_command(b"DATA", timeout=None)
        if go_ahead.code != SMTPStatus.start_input:
            raise SMTPDataError(go_ahead.code, go_ahead.message)
    except (SMTPResponseException, RecipientsRefused):
        await _reset(client, reply_wait)  # the server still holds this envelope
        raise
    if client.protocol is None:
        raise SMTPServerDisconnected("Connection lost")
    client.protocol.write(envelope.data)
    async with _reply_within(reply_wait):
        reply = await client.protocol.read_response(timeout=None)
    if reply.code != SMTPStatus.completed:
        raise SMTPDataError(reply.code, reply.message)  # the transaction is over either way
    return reply.message


def _reply_within(seconds: float) -> asyncio.Timeout:
    """The deadline for one reply, kept here rather than by aiosmtplib (its `timeout=None`).

    aiosmtplib waits for a reply with `asyncio.wait_for`, which on Python 3.11 resumes the
    send one turn of the event loop after the reply arrived. A message takes four replies,
    and the few pooled connections are what a burst of escalations queues for, so those
    turns cost throughput (bench/, docs/benchmarks.md).
    """
    return asyncio.timeout(seconds)


def data_lines(payload: bytes) -> bytes:
    """The message as it follows DATA (RFC 5321, 4.5.2): CRLF line ends, a dot that starts a
    line doubled, the closing dot line; byte for byte what aiosmtplib's `data()` writes.

    Written here because aiosmtplib's two regular expressions (line ends, leading dots) cost
    9% of the server's CPU at 16 clients, mostly on lines they leave as they are (bench/).
    """
    crlf = payload.count(b"\r\n")
    if payload.count(b"\r") != crlf or payload.count(b"\n") != crlf:
        payload = _LINE_END.sub(b"\r\n", payload)  # a bare CR or LF: never from as_bytes()
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    if payload.startswith(b"."):
        payload = b"." + payload
    return payload.replace(b"\r\n.", b"\r\n..") + b".\r\n"


async def _reset(client: SMTP, reply_wait: float) -> None:
    """RSET after a refusal, so the session can carry the next message; close it if that fails."""
    if not client.is_connected:
        return
    try:
        await client.rset(timeout=reply_wait)
    except Exception:
        client.close()


def _connection_died(err: BaseException) -> bool:
    """The symptoms of a connection the server closed while it sat idle in the pool."""
    if isinstance(err, SMTPServerDisconnected | ConnectionResetError | BrokenPipeError):
        return True
    if isinstance(err, SMTPResponseException) and err.code == 421:
        return True  # "service not available, closing channel": sent by servers that idle us out
    return isinstance(err, RecipientsRefused) and all(code == 421 for code, _ in err.refused.values())


def _rcpt_to(recipient: str) -> bytes:
    """RCPT's argument for a checked address (see `Envelope.mail_from`)."""
    return b"TO:<" + recipient.encode("ascii") + b">"


def _plain_address(address: str, role: str) -> str:
    """A bare ASCII addr-spec, safe on an SMTP command line; anything else is refused before connecting.

    (Non-ASCII addresses would need SMTPUTF8; the gateway's messages carry ASCII addresses only.)
    """
    text = address.strip()
    if not _is_plain(text):
        shown = mask_address(text)
        raise PermanentDeliveryError(f"the {role} address {shown} cannot be used in an SMTP envelope")
    return text


@functools.lru_cache(maxsize=256)
def _is_plain(text: str) -> bool:
    """Cached: the sender and the team address are in every envelope, and parsing an address
    (the email package's pure-Python parser) was a tenth of the SMTP transport's work (bench/)."""
    try:
        parsed = parse_address(text)
    except ValueError:
        return False
    local, at, domain = text.rpartition("@")
    return parsed == text and bool(local and at and domain) and text.isascii()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
