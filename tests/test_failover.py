"""Failover along EMAIL_TRANSPORT=acs,smtp: the fake ACS misbehaves, the SMTP sink takes over."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from tests.fake_acs import Answer, FakeAcs
from tests.smtp_sink import SMTPSink
from tests.support import SAMPLE_CALL, GatewayProcess, write_config

pytestmark = pytest.mark.anyio

SITE = {
    "email": {"timeout_seconds": 5, "retry_count": 3},
    "dispatcher": {
        "poll_interval_seconds": 0.2,
        "max_backoff_seconds": 0.5,
        "lease_margin_seconds": 1,
        "first_status_check_seconds": 0.2,
    },
}


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeAcs]:
    with FakeAcs(tmp_path / "acs") as service:
        yield service


@pytest.fixture
def sink() -> Iterator[SMTPSink]:
    with SMTPSink() as running:
        yield running


@pytest.fixture
def gateway(tmp_path: Path, fake: FakeAcs, sink: SMTPSink) -> Iterator[GatewayProcess]:
    env = {"EMAIL_TRANSPORT": "acs,smtp", **fake.environment(), **sink.env()}
    with GatewayProcess(write_config(tmp_path / "site", SITE), env=env) as process:
        yield process


async def sendemail(gateway: GatewayProcess, **changes: str) -> dict[str, Any]:
    async with Client(gateway.mcp_url) as client:
        result = await client.call_tool("sendemail", {**SAMPLE_CALL, **changes})
    assert not result.is_error, result.content
    return dict(result.structured_content)


async def test_refused_credentials_fail_over_to_smtp(
    gateway: GatewayProcess, fake: FakeAcs, sink: SMTPSink
) -> None:
    fake.fail_sends(
        Answer(401, "Denied", "Denied by the resource provider."),
        Answer(401, "Denied", "Denied by the resource provider."),
    )
    data = await sendemail(gateway)
    assert data["status"] == "sent"
    assert [d["transport"] for d in data["deliveries"]] == ["smtp", "smtp"]
    assert sorted(m.message_id for m in sink.wait_for(2)) == sorted(
        d["message_id"] for d in data["deliveries"]
    )
    assert fake.messages == []


async def test_acs_failing_transiently_past_its_attempts_fails_over(
    gateway: GatewayProcess, fake: FakeAcs, sink: SMTPSink
) -> None:
    # EMAIL_RETRY_COUNT=3 is shared along the chain: two attempts at ACS, then one at SMTP.
    fake.fail_sends(*[Answer(503, "ServiceUnavailable", "try later")] * 4)
    data = await sendemail(gateway)
    assert data["status"] == "sent"
    assert {d["transport"] for d in data["deliveries"]} == {"smtp"}
    assert all(d["attempts"] == 3 for d in data["deliveries"])
    assert len(sink.wait_for(2)) == 2


async def test_a_bad_recipient_is_not_failed_over(
    gateway: GatewayProcess, fake: FakeAcs, sink: SMTPSink
) -> None:
    fake.fail_sends(
        Answer(
            400,
            "InvalidRecipient",
            "The recipient address is invalid.",
            recipient=SAMPLE_CALL["customer_email"],
        )
    )
    data = await sendemail(gateway)
    customer, team = data["deliveries"]
    assert (customer["status"], customer["transport"], customer["attempts"]) == ("failed", "acs", 1)
    assert team["transport"] == "acs" and team["status"] in ("sent", "delivered")
    assert data["status"] == "partial"
    assert sink.messages == []
