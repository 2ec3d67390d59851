"""The escalation service in process: rules that need no network to prove."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.errors import RecipientLimitError
from tests.support import SAMPLE_CALL

pytestmark = pytest.mark.anyio


async def test_the_team_address_is_never_capped_even_as_a_customer(
    running_gateway: Callable[..., Any],
) -> None:
    async with running_gateway({"email": {"per_recipient_hourly_cap": 2}}, background=False) as gateway:
        for n in range(4):
            result = await gateway.service.sendemail(
                **{**SAMPLE_CALL, "ticket_id": f"TKT-2025-00000{n}", "customer_email": "support@bankx.com"}
            )
            assert result.status == "sent"
        for n in range(2):
            await gateway.service.sendemail(**{**SAMPLE_CALL, "ticket_id": f"TKT-2025-10000{n}"})
        with pytest.raises(RecipientLimitError, match="limit 2"):
            await gateway.service.sendemail(**{**SAMPLE_CALL, "ticket_id": "TKT-2025-100009"})


async def test_the_cap_holds_for_a_customer_who_changes_the_case_of_the_address(
    running_gateway: Callable[..., Any],
) -> None:
    # Not "support@": email-validator lower-cases well-known role mailboxes such as that one itself.
    patch = {"email": {"per_recipient_hourly_cap": 2, "support_team": "escalations@bankx.com"}}
    async with running_gateway(patch, background=False) as gateway:
        team_spellings = ["ESCALATIONS@bankx.com", "Escalations@BankX.com", "EsCalations@bankx.com"]
        for n, spelling in enumerate(team_spellings):
            # The team's own address, in any case, is still never capped.
            call = {**SAMPLE_CALL, "ticket_id": f"TKT-2025-20000{n}", "customer_email": spelling}
            assert (await gateway.service.sendemail(**call)).status == "sent"
        for n, spelling in enumerate(["jane.doe@example.com", "Jane.Doe@example.com"]):
            call = {**SAMPLE_CALL, "ticket_id": f"TKT-2025-30000{n}", "customer_email": spelling}
            await gateway.service.sendemail(**call)
        with pytest.raises(RecipientLimitError, match="limit 2"):
            call = {**SAMPLE_CALL, "ticket_id": "TKT-2025-300009", "customer_email": "JANE.DOE@example.com"}
            await gateway.service.sendemail(**call)


async def test_the_customer_address_keeps_its_case_and_goes_out_as_given(
    running_gateway: Callable[..., Any],
) -> None:
    async with running_gateway(background=False) as gateway:
        result = await gateway.service.sendemail(**{**SAMPLE_CALL, "customer_email": "Jane.Doe@Example.COM"})
    # The domain is case-insensitive and normalised; the part before the @ belongs to the recipient.
    assert result.recipients.customer == "Jane.Doe@example.com"
    assert result.deliveries[0].address == "Jane.Doe@example.com"
