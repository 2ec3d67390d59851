"""The contract every transport passes, like Django's shared mail-backend tests.

A transport's test module subclasses `TransportContract` and provides two things:
`transport` (an async fixture yielding a started transport) and `read_back(message)`,
which returns what the far side received for that message as `Captured` objects.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from gateway.errors import DeliveryError
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


def make_message(**changes: object) -> OutgoingMessage:
    delivery_id = str(uuid.uuid4())
    values: dict[str, object] = {
        "delivery_id": delivery_id,
        "message_id": f"<{delivery_id}@bankx.com>",
        "sender": "noreply@bankx.com",
        "recipients": ("customer@example.com",),
        "subject": "Support Ticket Created: TKT-2025-001234",
        "text": "Dear Valued Customer,\n\nTicket ID: TKT-2025-001234\n",
        "html": "<p>Dear Valued Customer,</p><p>Ticket ID: <b>TKT-2025-001234</b></p>",
        "date": datetime(2025, 11, 7, 7, 30, tzinfo=UTC),
        "headers": {"X-Ticket-ID": "TKT-2025-001234"},
    }
    values.update(changes)
    return OutgoingMessage(**values)  # type: ignore[arg-type]


class TransportContract:
    """Subclass, provide the `transport` fixture and `read_back`; every test here then runs."""

    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield

    async def read_back(self, message: OutgoingMessage) -> list[Captured]:  # pragma: no cover - overridden
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
        assert got.text.replace("\r\n", "\n").rstrip("\n") == message.text.rstrip("\n")
        assert "<b>TKT-2025-001234</b>" in got.html

    @pytest.mark.anyio
    async def test_ticket_header_and_message_id_reach_the_recipient(self, transport: Transport) -> None:
        message = make_message()
        await transport.send(message)
        [got] = await self.read_back(message)
        assert got.headers.get("X-Ticket-ID") == "TKT-2025-001234"
        if "Message-ID" in got.headers:  # ACS assigns its own; SMTP and files keep ours
            assert got.headers["Message-ID"] == message.message_id

    @pytest.mark.anyio
    async def test_non_ascii_subject_and_body_survive_intact(self, transport: Transport) -> None:
        message = make_message(
            subject="Support Ticket Created: TKT-2025-001234 — สอบถามดอกเบี้ย",
            text="ดอกเบี้ยเงินกู้บ้านเท่าไร? Ünïcödé ✓\nsecond line\n",
            html="<p>ดอกเบี้ยเงินกู้บ้านเท่าไร? Ünïcödé ✓</p>",
        )
        await transport.send(message)
        [got] = await self.read_back(message)
        assert got.subject == message.subject
        assert "ดอกเบี้ยเงินกู้บ้านเท่าไร? Ünïcödé ✓" in got.text
        assert "second line" in got.text
        assert "Ünïcödé ✓" in got.html

    @pytest.mark.anyio
    async def test_sending_the_same_message_again_keeps_its_identity(self, transport: Transport) -> None:
        message = make_message()
        await transport.send(message)
        await transport.send(message)
        received = await self.read_back(message)
        assert 1 <= len(received) <= 2
        assert all(r.subject == message.subject for r in received)

    @pytest.mark.anyio
    async def test_check_passes_when_the_far_side_is_up(self, transport: Transport) -> None:
        await transport.check()

    @pytest.mark.anyio
    async def test_errors_are_gateway_errors_never_sdk_exceptions(self, transport: Transport) -> None:
        bad = make_message(recipients=("not an address",))
        try:
            await transport.send(bad)
        except DeliveryError:
            pass
        except Exception as err:  # pragma: no cover - the failure this test exists for
            pytest.fail(f"{type(transport).__name__}.send leaked {type(err).__module__}.{type(err).__name__}")
