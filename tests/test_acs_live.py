"""One real email through real Azure Communication Services, only when credentials are given.

Set ACS_LIVE_CONNECTION_STRING (a resource's connection string), ACS_LIVE_SENDER (an
address of a domain linked to it) and ACS_LIVE_RECIPIENT (a mailbox you read). The
test sends one message, checks the credentials probe, and waits for ACS's verdict.
"""

from __future__ import annotations

import os
import time
import uuid

import anyio
import pytest
from gateway_acs import AcsSettings, AcsTransport

from tests.support import CONTRACT_VARIABLES
from tests.transport_contract import make_message

LIVE_VARIABLES = ("ACS_LIVE_CONNECTION_STRING", "ACS_LIVE_SENDER", "ACS_LIVE_RECIPIENT")
MISSING = [name for name in LIVE_VARIABLES if not os.environ.get(name)]

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING), reason=f"live ACS test: set {', '.join(MISSING)} to send one real email through ACS"
    ),
]


async def test_real_acs_accepts_one_email_and_confirms_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*CONTRACT_VARIABLES, "ACS_ENDPOINT", "ACS_REQUEST_TIMEOUT_SECONDS", "ACS_API_VERSION"):
        monkeypatch.delenv(name, raising=False)
    transport = AcsTransport(AcsSettings(connection_string=os.environ["ACS_LIVE_CONNECTION_STRING"]))
    await transport.start()
    try:
        await transport.check()
        message = make_message(
            sender=os.environ["ACS_LIVE_SENDER"],
            recipients=(os.environ["ACS_LIVE_RECIPIENT"],),
            subject=f"EscalationComms live test {uuid.uuid4().hex[:8]}",
        )
        receipt = await transport.send(message)
        assert receipt.status == "sent" and receipt.provider_id == message.delivery_id
        again = await transport.send(message)  # the same operation: ACS must not send a second email
        assert again.provider_id == receipt.provider_id
        deadline = time.monotonic() + 300
        update = await transport.status(receipt)
        while update.status == "sent" and time.monotonic() < deadline:
            await anyio.sleep(min(update.retry_after or 5.0, 30.0))
            update = await transport.status(receipt)
        assert update.status == "delivered", update.error
    finally:
        await transport.aclose()
