"""The contract every transport passes, like Django's shared mail-backend tests.

A transport's test module subclasses `TransportContract` and provides:

- `transport`: an async fixture yielding a started transport;
- `read_back(message)`: what the far side received for that message, as `Captured` objects,
  found by the message's X-Ticket-ID (unique per `make_message()`), never by its Message-ID,
  so the Message-ID a recipient sees is something the tests check rather than assume;
- `break_far_side()`: make the far side fail the next send (down, refusing, or unusable);
- `copies_after_sending_twice`: how many copies the far side holds after the same message
  was sent twice (1 when the transport or provider recognises the repeat, 2 when it cannot).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar

import pytest

from gateway.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from gateway.transport import OutgoingMessage, Transport


@dataclass
class Captured:
    """One message as the receiving side saw it."""

    sender: str
    recipients: list[str]
    subject: str
    text: str
    html: str
    headers: dict[str, str] = field(default_factory=dict)


_issued: set[str] = set()


def new_ticket_id() -> str:
    """A ticket id in the gateway's format, never the same twice in a test run, so that
    `read_back` can tell every test message apart."""
    while True:
        ticket = f"TKT-2025-{secrets.randbelow(1_000_000):06d}"
        if ticket not in _issued:
            _issued.add(ticket)
            return ticket


def make_message(*, ticket: str | None = None, **changes: object) -> OutgoingMessage:
    """A finished message about `ticket` (a fresh one by default) with a fresh delivery id and
    Message-ID; `changes` override any field of `OutgoingMessage`."""
    delivery_id = str(uuid.uuid4())
    ticket = ticket or new_ticket_id()
    values: dict[str, object] = {
        "delivery_id": delivery_id,
        "message_id": f"<{delivery_id}@bankx.com>",
        "sender": "noreply@bankx.com",
        "recipients": ("customer@example.com",),
        "subject": f"Support Ticket Created: {ticket}",
        "text": f"Dear Valued Customer,\n\nTicket ID: {ticket}\n",
        "html": f"<p>Dear Valued Customer,</p><p>Ticket ID: <b>{ticket}</b></p>",
        "date": datetime(2025, 11, 7, 7, 30, tzinfo=UTC),
        "headers": {"X-Ticket-ID": ticket},
    }
    values.update(changes)
    return OutgoingMessage(**values)  # type: ignore[arg-type]


def ticket_of(message: OutgoingMessage) -> str:
    """The X-Ticket-ID that `read_back` finds a message by."""
    return message.headers["X-Ticket-ID"]


def _body(text: str) -> str:
    """A body as sent, whatever line ends the far side stored and whether it added a final one."""
    return text.replace("\r\n", "\n").rstrip("\n")


class TransportContract:
    """Subclass, provide the members the module doc lists; every test here then runs."""

    copies_after_sending_twice: ClassVar[int]

    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield

    async def read_back(self, message: OutgoingMessage) -> list[Captured]:  # pragma: no cover - overridden
        raise NotImplementedError

    async def break_far_side(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.mark.anyio
    async def test_sent_message_arrives_with_subject_bodies_and_addresses(self, transport: Transport) -> None:
        message = make_message()
        receipt = await transport.send(message)
        assert receipt.status in ("sent", "delivered")
        [got] = await self.read_back(message)
        assert got.sender == "noreply@bankx.com"
        assert got.recipients == ["customer@example.com"]
        assert got.subject == message.subject
        assert _body(got.text) == _body(message.text)
        assert _body(got.html) == _body(message.html)

    @pytest.mark.anyio
    async def test_ticket_header_and_message_id_reach_the_recipient(self, transport: Transport) -> None:
        other, message = make_message(), make_message()
        await transport.send(other)
        await transport.send(message)
        # read_back finds a message by its X-Ticket-ID alone: finding it proves the header arrived.
        [got] = await self.read_back(message)
        [got_other] = await self.read_back(other)
        assert got.headers["Message-ID"] == message.message_id  # ours, kept by every transport
        assert got_other.headers["Message-ID"] == other.message_id

    @pytest.mark.anyio
    async def test_non_ascii_subject_and_body_survive_intact(self, transport: Transport) -> None:
        ticket = new_ticket_id()
        message = make_message(
            ticket=ticket,
            subject=f"Support Ticket Created: {ticket} — สอบถามดอกเบี้ย",
            text="ดอกเบี้ยเงินกู้บ้านเท่าไร? Ünïcödé ✓\nsecond line\n",
            html="<p>ดอกเบี้ยเงินกู้บ้านเท่าไร? Ünïcödé ✓</p>",
        )
        await transport.send(message)
        [got] = await self.read_back(message)
        assert got.subject == message.subject
        assert _body(got.text) == _body(message.text)
        assert _body(got.html) == _body(message.html)

    @pytest.mark.anyio
    async def test_sending_the_same_message_again_keeps_its_identity(self, transport: Transport) -> None:
        message = make_message()
        await transport.send(message)
        await transport.send(message)
        received = await self.read_back(message)
        assert len(received) == self.copies_after_sending_twice
        sent = (
            message.subject,
            _body(message.text),
            _body(message.html),
            message.message_id,
            ticket_of(message),
        )
        for got in received:
            copy = (
                got.subject,
                _body(got.text),
                _body(got.html),
                got.headers["Message-ID"],
                got.headers["X-Ticket-ID"],
            )
            assert copy == sent

    @pytest.mark.anyio
    async def test_check_passes_when_the_far_side_is_up(self, transport: Transport) -> None:
        await transport.check()

    @pytest.mark.anyio
    async def test_errors_are_gateway_errors_never_sdk_exceptions(self, transport: Transport) -> None:
        await self.break_far_side()
        message = make_message()
        with pytest.raises(DeliveryError) as caught:  # an SDK exception would escape this and fail the test
            await transport.send(message)
        assert type(caught.value) in (TransientDeliveryError, PermanentDeliveryError)
        assert await self.read_back(message) == []
