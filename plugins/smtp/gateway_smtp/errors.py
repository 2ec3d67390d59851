"""The one place where SMTP failures become gateway errors.

    aiosmtplib / ssl / OS failure                   gateway error
    ─────────────────────────────────────────────   ─────────────────────────────────────────────
    4xx reply (any command), 421 closing            TransientDeliveryError
    refused connection, DNS failure, reset          TransientDeliveryError
    timeout (connect, greeting, any reply)          TransientDeliveryError
    disconnect (also in DATA: outcome unknown)      TransientDeliveryError
    5xx reply to RCPT or DATA                       PermanentDeliveryError (this message)
    5xx greeting/EHLO, 5xx sender refused           PermanentDeliveryError(transport_level=True)
    authentication refused, AUTH/STARTTLS missing   PermanentDeliveryError(transport_level=True)
    certificate not trusted, TLS handshake error    PermanentDeliveryError(transport_level=True)
    address that cannot go on an SMTP command line  PermanentDeliveryError (this message)

Messages name the server and the step, quote the server's reply, mask recipient
addresses and never contain the password.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterable, Mapping

from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPNotSupported,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)

from gateway.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from gateway.logs import mask_address

#: exceptions `delivery_error` knows how to translate (anything else is a bug and propagates)
MAPPED: tuple[type[BaseException], ...] = (SMTPException, OSError, TimeoutError, ValueError)

#: 5xx replies that say this client (its credentials or TLS state) is refused, not this message
_TRANSPORT_LEVEL_CODES = {530, 534, 535, 538}

_NOT_THIS_CLIENT = "refused this client (check SMTP_USERNAME, SMTP_PASSWORD and SMTP_SECURITY)"

#: how much of a server's reply is quoted in a message
_REPLY_CHARS = 200


class RecipientsRefused(SMTPException):
    """At least one RCPT was refused, so the transaction was reset before DATA: nobody got the message.

    aiosmtplib reports a partial refusal as success (the refused addresses in a dict);
    refusing the whole message instead keeps "sent" meaning "sent to every recipient"
    and makes a retry safe, because no recipient has a copy yet.
    """

    def __init__(self, refused: Mapping[str, tuple[int, str]], total: int) -> None:
        super().__init__(f"{len(refused)} of {total} recipients refused")
        self.refused = dict(refused)
        self.total = total


class Scrubber:
    """Masks recipient addresses and removes secrets from text that goes into errors and logs."""

    def __init__(self, addresses: Iterable[str] = (), secrets: Iterable[str] = ()) -> None:
        self.replacements = [(s, "***") for s in secrets if s]
        longest_first = sorted({a for a in addresses if a}, key=len, reverse=True)
        self.replacements += [(a, mask_address(a)) for a in longest_first]

    def __call__(self, text: str) -> str:
        text = " / ".join(line.strip() for line in str(text).splitlines() if line.strip())
        for secret, shown in self.replacements:
            text = text.replace(secret, shown)
        return text if len(text) <= _REPLY_CHARS else text[: _REPLY_CHARS - 3] + "..."


def delivery_error(err: BaseException, *, server: str, step: str, scrub: Scrubber) -> DeliveryError:
    """Translate one failure of SMTP step `step` (connect, mail, rcpt, data, check) against `server`."""
    if isinstance(err, DeliveryError):
        return err
    tls = _ssl_error(err)
    if tls is not None:
        return _tls_error(tls, server)
    if isinstance(err, RecipientsRefused):
        return _refused(err, server, scrub)
    if isinstance(err, SMTPResponseException) and err.code == 421:
        # "Service not available, closing transmission channel", whatever the command was.
        return TransientDeliveryError(
            f"{server} is closing the connection ({_step(step)}): 421 {scrub(err.message)}"
        )
    if isinstance(err, SMTPAuthenticationError):
        reply = f"{err.code} {scrub(err.message)}"
        if 400 <= err.code < 500:
            return TransientDeliveryError(f"{server} could not check the credentials now: {reply}")
        return PermanentDeliveryError(f"{server} refused the SMTP credentials: {reply}", transport_level=True)
    if isinstance(err, SMTPSenderRefused):
        reply = f"{err.code} {scrub(err.message)}"
        if 400 <= err.code < 500:
            return TransientDeliveryError(f"{server} deferred the sender {err.sender}: {reply}")
        if err.code in _TRANSPORT_LEVEL_CODES:  # 530: authenticate (or STARTTLS) first
            return PermanentDeliveryError(f"{server} {_NOT_THIS_CLIENT}: {reply}", transport_level=True)
        return PermanentDeliveryError(
            f"{server} refused the sender address {err.sender}: {reply}", transport_level=True
        )
    if isinstance(err, SMTPConnectResponseError | SMTPHeloError):
        reply = f"{err.code} {scrub(err.message)}"
        what = "greeting" if isinstance(err, SMTPConnectResponseError) else "EHLO"
        if 400 <= err.code < 500:
            return TransientDeliveryError(f"{server} is not accepting mail now ({what}): {reply}")
        return PermanentDeliveryError(f"{server} refused this client ({what}): {reply}", transport_level=True)
    if isinstance(err, SMTPResponseException):
        return _reply(err.code, err.message, server, step, scrub, data=isinstance(err, SMTPDataError))
    if isinstance(err, TimeoutError):  # SMTPTimeoutError, SMTPConnectTimeoutError and asyncio's
        return TransientDeliveryError(f"{server} did not answer in time ({_step(step)})")
    if isinstance(err, SMTPServerDisconnected):
        if step == "data":
            return TransientDeliveryError(
                f"{server} closed the connection during DATA; the message was not confirmed"
            )
        return TransientDeliveryError(f"{server} closed the connection ({_step(step)})")
    if isinstance(err, SMTPConnectError):
        cause = err.__cause__
        if isinstance(cause, socket.gaierror):
            return TransientDeliveryError(f"cannot resolve the SMTP host of {server}: {cause.strerror}")
        if isinstance(cause, OSError) and cause.errno:
            reason = os.strerror(cause.errno)  # "Connection refused", not asyncio's "Connect call failed"
        else:
            reason = scrub(err.message)
        return TransientDeliveryError(f"cannot connect to SMTP server {server}: {reason}")
    if isinstance(err, SMTPNotSupported):
        return PermanentDeliveryError(f"{server} cannot take this message: {scrub(err.message)}")
    if isinstance(err, SMTPException):
        # aiosmtplib raises the bare class for a server without STARTTLS or AUTH, or no common
        # AUTH mechanism: the configuration does not match this server.
        return PermanentDeliveryError(
            f"{server} does not support what the settings ask for: {scrub(err.message)}", transport_level=True
        )
    if isinstance(err, OSError):
        reason = os.strerror(err.errno) if err.errno else type(err).__name__
        return TransientDeliveryError(f"connection to SMTP server {server} failed: {reason}")
    if isinstance(err, ValueError):
        return PermanentDeliveryError(f"cannot be sent over SMTP: {scrub(str(err))}")
    raise TypeError(f"no SMTP error mapping for {type(err).__name__}") from err


def _reply(code: int, message: str, server: str, step: str, scrub: Scrubber, *, data: bool) -> DeliveryError:
    reply = f"{code} {scrub(message)}"
    where = "refused the message" if data else f"refused the command ({_step(step)})"
    if 400 <= code < 500:
        return TransientDeliveryError(f"{server} deferred ({_step(step)}): {reply}")
    if 500 <= code < 600:
        if code in _TRANSPORT_LEVEL_CODES:
            return PermanentDeliveryError(f"{server} {_NOT_THIS_CLIENT}: {reply}", transport_level=True)
        if step in ("connect", "check"):
            return PermanentDeliveryError(f"{server} {where}: {reply}", transport_level=True)
        return PermanentDeliveryError(f"{server} {where}: {reply}")
    # Not an SMTP error code (a malformed or unexpected reply): the exchange went wrong, not the message.
    return TransientDeliveryError(f"{server} sent an unexpected reply ({_step(step)}): {reply}")


def _refused(err: RecipientsRefused, server: str, scrub: Scrubber) -> DeliveryError:
    parts = [f"{scrub(addr)}: {code} {scrub(text)}" for addr, (code, text) in err.refused.items()]
    detail = "; ".join(parts)
    some = ""
    if len(err.refused) < err.total:
        some = f" ({len(err.refused)} of {err.total}; nobody was sent the message)"
    if any(500 <= code < 600 for code, _ in err.refused.values()):
        if all(code in _TRANSPORT_LEVEL_CODES for code, _ in err.refused.values()):
            return PermanentDeliveryError(f"{server} {_NOT_THIS_CLIENT}: {detail}", transport_level=True)
        return PermanentDeliveryError(f"{server} refused the recipient{some}: {detail}")
    return TransientDeliveryError(f"{server} deferred the recipient{some}: {detail}")


def _ssl_error(err: BaseException) -> ssl.SSLError | None:
    """The TLS failure behind `err`, if any (aiosmtplib wraps it as a connect error, or not at all)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _tls_error(err: ssl.SSLError, server: str) -> DeliveryError:
    if isinstance(err, ssl.SSLCertVerificationError):
        return PermanentDeliveryError(
            f"the TLS certificate of {server} is not trusted: {err.verify_message} "
            "(set transports.smtp.ca_bundle / SMTP_CA_BUNDLE to the relay's CA)",
            transport_level=True,
        )
    if isinstance(err, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return TransientDeliveryError(f"{server} closed the connection during the TLS handshake")
    reason = err.reason or type(err).__name__
    return PermanentDeliveryError(
        f"TLS with {server} failed: {reason} (check SMTP_SECURITY: tls for port 465, starttls for 587)",
        transport_level=True,
    )


def _step(step: str) -> str:
    return {
        "connect": "while connecting",
        "mail": "to MAIL FROM",
        "rcpt": "to RCPT TO",
        "data": "to DATA",
        "check": "to the readiness probe",
    }.get(step, step)
