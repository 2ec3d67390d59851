"""A real SMTP server for tests: aiosmtpd on a free 127.0.0.1 port, scriptable to misbehave.

    with SMTPSink() as sink:                       # plain SMTP, no AUTH
        ...point SMTP_PORT (sink.env()) at it...
        sink.wait_for(2)                           # the two emails of one escalation
        assert sink.message_ids() == [...]

It runs in its own thread (aiosmtpd's `Controller`), so it serves a gateway running
in this process or in a subprocess alike. Everything it records is thread-safe to
read from the test. What it can be told to do:

- `security="starttls"` or `"tls"` (implicit TLS): a certificate from a throwaway CA
  made with trustme; clients trust `sink.ca_bundle`.
- `auth=("user", "secret")`: AUTH PLAIN/LOGIN with these credentials, required
  before MAIL (530 otherwise); `auth_require_tls=False` offers it over plain SMTP.
- `fail_next(n, code=451)`: answer the next n messages (at the end of DATA) with an error.
- `fail_fraction(p, seed=...)`: answer a seeded random fraction p of messages with 451.
- `refuse_recipient(address, code=550)`: refuse RCPT TO for an address.
- `drop_after_each_message()`: close the connection right after each accepted message.
- `hang_up_at_next_mail(n)`: at MAIL, answer 421 and close (a session the server timed out).
- `stall("greeting" | "mail" | "data")`: accept, then never answer at that point.
- `down()` / `up()`: stop listening (dropping open connections) and listen again on
  the same port.
- `connections` counts TCP connections opened by clients; `peak_connections` the most
  open at once.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

Security = Literal["none", "starttls", "tls"]
StallPoint = Literal["greeting", "mail", "data"]

SINK_HOSTNAME = "sink.test"


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the sink accepted: the SMTP envelope, the raw bytes and the parsed message."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    message: EmailMessage
    connection: int  # the number of the TCP connection it arrived on (1, 2, ...)
    tls: bool  # it arrived over TLS (STARTTLS or implicit)
    mail_options: tuple[str, ...] = ()  # what MAIL FROM carried after the address (SIZE=...)

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])

    def header(self, name: str) -> str | None:
        value = self.message[name]
        return None if value is None else str(value)


@dataclass(frozen=True)
class LocalCA:
    """A throwaway certificate authority and a server certificate for 127.0.0.1 and localhost."""

    ca: trustme.CA
    server_cert: trustme.LeafCert
    bundle: Path  # the CA certificate in PEM: give it to clients (SMTP_CA_BUNDLE)

    @classmethod
    def create(cls, directory: Path) -> LocalCA:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        server_cert = ca.issue_cert("127.0.0.1", "localhost", SINK_HOSTNAME)
        bundle = directory / "sink-ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        return cls(ca=ca, server_cert=server_cert, bundle=bundle)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(context)
        return context


class _Script:
    """What the sink has been told to do; read in the server thread, set from the test."""

    def __init__(self) -> None:
        self.fail_next: list[tuple[int, str]] = []
        self.fail_fraction = 0.0
        self.fail_fraction_code = 451
        self.random = random.Random(0)
        self.refused: dict[str, int] = {}
        self.drop_after_message = False
        self.hang_up_at_mail: list[bool] = []
        self.data_command_replies: list[str] = []
        self.mail_replies: list[str] = []
        self.refuse_ehlo = False
        self.stall: StallPoint | None = None


class SMTPSink:
    """A real aiosmtpd server on 127.0.0.1 (a free port unless `port` is given). See the module doc."""

    def __init__(
        self,
        *,
        port: int | None = None,
        security: Security = "none",
        ca: LocalCA | None = None,
        auth: tuple[str, str] | None = None,
        auth_require_tls: bool = True,
        idle_timeout: float = 300.0,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.security = security
        self.auth = auth
        self.auth_require_tls = auth_require_tls
        self.idle_timeout = idle_timeout
        self._own_ca_dir: Path | None = None
        if security != "none" and ca is None:
            self._own_ca_dir = Path(tempfile.mkdtemp(prefix="smtp-sink-ca-"))
            ca = LocalCA.create(self._own_ca_dir)
        self.ca = ca
        self._lock = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._connections = 0
        self._open = 0
        self._peak = 0
        self._attempts = 0
        self._logins: list[tuple[str, bool]] = []
        self._script = _Script()
        self._probe_ports: set[int] = set()
        self._live: set[_SinkSMTP] = set()
        self._controller: _SinkController | None = None

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> SMTPSink:
        """Listen (alias of `up`)."""
        return self.up()

    def up(self) -> SMTPSink:
        """Start listening on `self.port` (again, after `down`)."""
        if self._controller is not None:
            return self
        controller = _SinkController(self)
        deadline = time.monotonic() + 5.0
        while True:  # the port may still be held briefly by the previous listener
            try:
                controller.start()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                controller = _SinkController(self)
                time.sleep(0.05)
        self._controller = controller
        return self

    def down(self) -> None:
        """Stop listening and drop every open connection, like a server that went away."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        loop = controller.loop

        async def drop_all() -> None:
            for server in list(self._live):
                if isinstance(server.transport, asyncio.Transport):
                    server.transport.abort()  # no goodbye: like a crashed or unplugged server
            for _ in range(200):  # until each connection_lost ran: the sockets are really closed
                if not self._live:
                    return
                await asyncio.sleep(0.01)

        if loop.is_running():
            asyncio.run_coroutine_threadsafe(drop_all(), loop).result(timeout=5)
        controller.stop()

    def stop(self) -> None:
        """Stop listening for good and remove the CA files the sink made itself."""
        self.down()
        if self._own_ca_dir is not None:
            shutil.rmtree(self._own_ca_dir, ignore_errors=True)
            self._own_ca_dir = None

    @property
    def is_up(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> SMTPSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what clients need -----------------------------------------------------------------------

    @property
    def ca_bundle(self) -> Path | None:
        return self.ca.bundle if self.ca is not None else None

    def env(self) -> dict[str, str]:
        """The SMTP_* variables that point the gateway's smtp transport at this sink."""
        values = {"SMTP_HOST": self.host, "SMTP_PORT": str(self.port), "SMTP_SECURITY": self.security}
        if self.ca_bundle is not None:
            values["SMTP_CA_BUNDLE"] = str(self.ca_bundle)
        if self.auth is not None:
            values["SMTP_USERNAME"], values["SMTP_PASSWORD"] = self.auth
        return values

    def settings(self) -> dict[str, Any]:
        """The same as `env()`, as a `transports.smtp` config block."""
        block: dict[str, Any] = {"host": self.host, "port": self.port, "security": self.security}
        if self.ca_bundle is not None:
            block["ca_bundle"] = str(self.ca_bundle)
        if self.auth is not None:
            block["username"], block["password"] = self.auth
        return block

    # -- what it saw -----------------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Accepted messages, in arrival order (a copy)."""
        with self._lock:
            return list(self._messages)

    def message_ids(self) -> list[str]:
        return [m.message_id for m in self.messages]

    @property
    def connections(self) -> int:
        """TCP connections opened by clients since start (or `reset`)."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    @property
    def peak_connections(self) -> int:
        """The most client connections open at the same time."""
        with self._lock:
            return self._peak

    @property
    def attempts(self) -> int:
        """Messages received to the end of DATA, accepted or answered with an error."""
        with self._lock:
            return self._attempts

    @property
    def logins(self) -> list[tuple[str, bool]]:
        """(user name, succeeded) for each AUTH attempt."""
        with self._lock:
            return list(self._logins)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Block until at least `count` messages were accepted; return them all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"the SMTP sink got {len(self._messages)} messages; "
                        f"expected {count} within {timeout}s"
                    )
                self._lock.wait(left)
            return list(self._messages)

    def reset(self) -> None:
        """Forget messages, counters and scripted behaviour (the listener stays as it is)."""
        with self._lock:
            self._messages.clear()
            self._connections = 0
            self._peak = self._open
            self._attempts = 0
            self._logins.clear()
            self._script = _Script()

    # -- scripted behaviour ----------------------------------------------------------------------

    def fail_next(self, n: int = 1, code: int = 451, text: str | None = None) -> None:
        """Answer the next `n` messages with `code` at the end of DATA (nothing is kept)."""
        reply = f"{code} {text or _default_text(code)}"
        with self._lock:
            self._script.fail_next.extend([(code, reply)] * n)

    def fail_fraction(self, p: float, seed: int = 0, code: int = 451) -> None:
        """Answer a fraction `p` of messages (seeded, so runs repeat) with `code`."""
        with self._lock:
            self._script.fail_fraction = p
            self._script.fail_fraction_code = code
            self._script.random = random.Random(seed)

    def refuse_recipient(self, address: str, code: int = 550) -> None:
        """Refuse RCPT TO:<address> with `code` (550: no such user, 451: try later)."""
        with self._lock:
            self._script.refused[address.lower()] = code

    def accept_recipient(self, address: str) -> None:
        """Take back `refuse_recipient`: RCPT TO:<address> is accepted again."""
        with self._lock:
            self._script.refused.pop(address.lower(), None)

    def drop_after_each_message(self, enabled: bool = True) -> None:
        """Close the connection right after answering 250 to each message."""
        with self._lock:
            self._script.drop_after_message = enabled

    def hang_up_at_next_mail(self, n: int = 1, *, reply: bool = True) -> None:
        """At the next `n` MAIL commands, hang up: after "421 4.4.2 ... timeout" (`reply`) or silently.

        This is what a client meets when it reuses a connection the server has
        just timed out, or a relay restarted meanwhile.
        """
        with self._lock:
            self._script.hang_up_at_mail.extend([reply] * n)

    def speak_helo_only(self, enabled: bool = True) -> None:
        """Answer EHLO with 502, as a server from before ESMTP does (clients fall back to HELO)."""
        with self._lock:
            self._script.refuse_ehlo = enabled

    def refuse_sender(self, n: int = 1, code: int = 550) -> None:
        """Answer the next `n` MAIL commands with `code` (550: sender not allowed, 451: try later)."""
        with self._lock:
            self._script.mail_replies.extend([f"{code} {_default_text(code, sender=True)}"] * n)

    def refuse_data_command(self, n: int = 1, code: int = 451) -> None:
        """Answer the next `n` DATA commands with `code` instead of 354: no message follows."""
        with self._lock:
            self._script.data_command_replies.extend([f"{code} {_default_text(code)}"] * n)

    def stall(self, at: StallPoint | None = "greeting") -> None:
        """Never answer at this point (greeting: accept TCP, send nothing); None answers again."""
        with self._lock:
            self._script.stall = at

    # -- called from the server thread -----------------------------------------------------------

    def _opened(self, server: _SinkSMTP) -> int:
        with self._lock:
            self._live.add(server)
            self._connections += 1
            self._open += 1
            self._peak = max(self._peak, self._open)
            return self._connections

    def _closed(self, server: _SinkSMTP) -> None:
        with self._lock:
            self._live.discard(server)
            self._open -= 1

    def _hang_up_now(self) -> bool | None:
        """None: carry on; else hang up, with (True) or without (False) a 421 first."""
        with self._lock:
            return self._script.hang_up_at_mail.pop(0) if self._script.hang_up_at_mail else None

    def _stall_at(self, point: StallPoint) -> bool:
        with self._lock:
            return self._script.stall == point

    def _recipient_reply(self, address: str) -> str | None:
        with self._lock:
            code = self._script.refused.get(address.lower())
        return None if code is None else f"{code} {_default_text(code, recipient=True)}"

    def _data_reply(self) -> str | None:
        """None to accept this message, else the error reply the script asks for."""
        with self._lock:
            self._attempts += 1
            script = self._script
            if script.fail_next:
                return script.fail_next.pop(0)[1]
            if script.fail_fraction and script.random.random() < script.fail_fraction:
                return f"{script.fail_fraction_code} {_default_text(script.fail_fraction_code)}"
            return None

    def _accept(self, envelope: Envelope, connection: int, tls: bool) -> None:
        data = envelope.original_content or b""
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        received = ReceivedMessage(
            sender=envelope.mail_from or "",
            recipients=tuple(envelope.rcpt_tos),
            data=data,
            message=parsed,
            connection=connection,
            tls=tls,
            mail_options=tuple(envelope.mail_options),
        )
        with self._lock:
            self._messages.append(received)
            self._lock.notify_all()

    def _login(self, user: str, ok: bool) -> None:
        with self._lock:
            self._logins.append((user, ok))


def _default_text(code: int, *, recipient: bool = False, sender: bool = False) -> str:
    if sender:
        return "5.7.1 Sender address rejected" if code >= 500 else "4.3.0 Sender deferred, try later"
    if recipient:
        return "5.1.1 Recipient address rejected" if code >= 500 else "4.2.0 Recipient deferred, try later"
    return "5.6.0 Message refused" if code >= 500 else "4.3.0 Temporary failure, try again later"


class _Handler:
    """aiosmtpd handler hooks: sink's script decides the replies."""

    def __init__(self, sink: SMTPSink) -> None:
        self.sink = sink

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.sink.auth is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if self.sink._stall_at("mail"):
            await asyncio.Event().wait()  # until the client gives up and the connection closes
        with self.sink._lock:
            replies = self.sink._script.mail_replies
            refusal = replies.pop(0) if replies else None
        if refusal is not None:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self.sink._recipient_reply(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink._stall_at("data"):
            await asyncio.Event().wait()
        refusal = self.sink._data_reply()
        if refusal is not None:
            return refusal
        assert isinstance(server, _SinkSMTP)
        tls = server.transport is not None and server.transport.get_extra_info("sslcontext") is not None
        self.sink._accept(envelope, server.number, tls)
        return "250 2.0.0 OK queued"


class _SinkSMTP(SMTP):
    """aiosmtpd's server protocol, counting connections and able to stall or hang up."""

    number = 0  # this connection's number; 0 for the controller's own start-up probe

    def __init__(self, sink: SMTPSink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink = sink

    async def _handle_client(self) -> None:
        assert self.session is not None
        peer = self.session.peer
        if isinstance(peer, tuple) and peer[1] in self.sink._probe_ports:
            self.sink._probe_ports.discard(peer[1])
        else:
            self.number = self.sink._opened(self)
            if self.sink._stall_at("greeting"):
                await asyncio.Event().wait()  # cancelled when the client closes the connection
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        if self.number:
            self.sink._closed(self)
        super().connection_lost(error)

    async def smtp_EHLO(self, hostname: str) -> None:
        with self.sink._lock:
            refuse = self.sink._script.refuse_ehlo
        if refuse:
            await self.push("502 5.5.1 EHLO not implemented")
            return
        await super().smtp_EHLO(hostname)

    async def smtp_MAIL(self, arg: str | None) -> None:
        hang_up = self.sink._hang_up_now()
        if hang_up is None:
            await super().smtp_MAIL(arg)
            return
        if hang_up:
            await self.push(f"421 4.4.2 {SINK_HOSTNAME} Error: timeout exceeded")
        if self.transport is not None:
            self.transport.close()

    async def smtp_DATA(self, arg: str) -> None:
        with self.sink._lock:
            replies = self.sink._script.data_command_replies
            refusal = replies.pop(0) if replies else None
        if refusal is not None:
            await self.push(refusal)  # the envelope stays, as a real server keeps it
            return
        await super().smtp_DATA(arg)
        with self.sink._lock:
            drop = self.sink._script.drop_after_message
        if drop and self.transport is not None:
            self.transport.close()


class _SinkController(Controller):
    def __init__(self, sink: SMTPSink) -> None:
        kwargs: dict[str, Any] = {
            "enable_SMTPUTF8": True,
            "timeout": sink.idle_timeout,
            "auth_require_tls": sink.auth_require_tls,
        }
        ssl_context = None
        if sink.ca is not None and sink.security == "starttls":
            kwargs.update(tls_context=sink.ca.server_context(), require_starttls=True)
        elif sink.ca is not None and sink.security == "tls":
            ssl_context = sink.ca.server_context()
        if sink.auth is not None:
            kwargs["authenticator"] = _authenticator(sink)
        super().__init__(
            _Handler(sink),
            hostname=sink.host,
            port=sink.port,
            ssl_context=ssl_context,
            server_hostname=SINK_HOSTNAME,
            **kwargs,
        )
        self.sink = sink

    def factory(self) -> SMTP:
        return _SinkSMTP(self.sink, self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Like aiosmtpd's own start-up probe, but from a known port, so it is not counted.
        with ExitStack() as stack:
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.settimeout(1.0)
            probe.bind((self.sink.host, 0))
            self.sink._probe_ports.add(probe.getsockname()[1])
            probe.connect((self.sink.host, self.port))
            if self.ssl_context is not None:
                client = ssl.create_default_context()
                client.check_hostname = False
                client.verify_mode = ssl.CERT_NONE
                probe = stack.enter_context(client.wrap_socket(probe))
            probe.recv(1024)


def _authenticator(sink: SMTPSink) -> Callable[..., AuthResult]:
    assert sink.auth is not None
    user, password = sink.auth

    def check(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = data.login.decode("utf-8", "replace")
        ok = login == user and data.password.decode("utf-8", "replace") == password
        sink._login(login, ok)
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    return check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def smtp_sink(**kwargs: Any) -> Iterator[SMTPSink]:
    """`with smtp_sink(security="tls") as sink:` - the same as `with SMTPSink(...)`."""
    sink = SMTPSink(**kwargs)
    with sink:
        yield sink
