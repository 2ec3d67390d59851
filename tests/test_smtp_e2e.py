"""End to end over SMTP: the real gateway process, the real MCP client, a real aiosmtpd sink."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client

from tests.smtp_sink import SMTPSink
from tests.support import SAMPLE_CALL, GatewayProcess, wait_for, write_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def sink() -> Iterator[SMTPSink]:
    with SMTPSink() as running:
        yield running


def smtp_gateway(
    directory: Path, sink: SMTPSink, patch: dict[str, Any] | None = None, **env: str
) -> GatewayProcess:
    config = write_config(directory, patch)
    return GatewayProcess(config, env={"EMAIL_TRANSPORT": "smtp", **sink.env(), **env})


async def test_smtp_sendemail_over_mcp_delivers_both_emails_to_the_sink(
    sink: SMTPSink, tmp_path: Path
) -> None:
    with smtp_gateway(tmp_path / "site", sink) as gateway:
        async with Client(gateway.mcp_url) as client:
            result = await client.call_tool("sendemail", SAMPLE_CALL)
    assert not result.is_error, result.content
    data = result.structured_content
    assert data["status"] == "sent"
    assert [(d["role"], d["status"], d["transport"], d["attempts"]) for d in data["deliveries"]] == [
        ("customer", "sent", "smtp", 1),
        ("bank_team", "sent", "smtp", 1),
    ]
    received = {m.recipients: m for m in sink.wait_for(2)}
    assert len(sink.messages) == 2

    customer = received[("customer@example.com",)]
    assert customer.sender == "noreply@bankx.com"
    assert customer.subject == "Support Ticket Created: TKT-2025-001234"
    assert customer.header("To") == "customer@example.com"
    assert customer.header("From") == "noreply@bankx.com"
    assert customer.header("X-Ticket-ID") == "TKT-2025-001234"
    assert customer.message_id == data["deliveries"][0]["message_id"]
    assert customer.message.get_content_type() == "multipart/alternative"

    team = received[("support@bankx.com",)]
    assert team.subject == "New Support Ticket: TKT-2025-001234 (UC2)"
    assert team.header("To") == "support@bankx.com"
    assert team.header("X-Ticket-ID") == "TKT-2025-001234"
    assert team.message_id == data["deliveries"][1]["message_id"]


async def test_smtp_200_concurrent_sendemail_calls_all_succeed_within_the_pool(
    sink: SMTPSink, tmp_path: Path
) -> None:
    calls = [
        {**SAMPLE_CALL, "ticket_id": f"TKT-2025-{200000 + i}", "customer_email": f"customer{i}@example.com"}
        for i in range(200)
    ]
    sessions = 8

    async def one_session(batch: list[dict[str, str]]) -> list[Any]:
        async with Client(gateway.mcp_url) as client:
            return await asyncio.gather(*(client.call_tool("sendemail", c) for c in batch))

    with smtp_gateway(tmp_path / "site", sink) as gateway:
        batches = [calls[i::sessions] for i in range(sessions)]
        results = [r for batch in await asyncio.gather(*(one_session(b) for b in batches)) for r in batch]

    assert len(results) == 200
    assert [r.structured_content["status"] for r in results if not r.is_error] == ["sent"] * 200
    assert len(sink.messages) == 400
    assert len(set(sink.message_ids())) == 400
    tickets = {m.header("X-Ticket-ID") for m in sink.messages}
    assert tickets == {c["ticket_id"] for c in calls}
    assert sink.connections <= 4  # the contract's default pool size, counted at the server


async def test_smtp_gateway_starts_while_the_mail_server_is_down_and_delivers_once_it_is_up(
    tmp_path: Path,
) -> None:
    sink = SMTPSink()  # a port is reserved, nothing listens yet
    fast_retries = {"dispatcher": {"poll_interval_seconds": 0.2, "max_backoff_seconds": 0.5}}
    try:
        with smtp_gateway(tmp_path / "site", sink, fast_retries, EMAIL_RETRY_COUNT="1") as gateway:
            ready = httpx2.get(f"{gateway.url}/readyz", timeout=10)
            assert ready.status_code == 503
            assert "cannot connect" in ready.json()["checks"]["transport:smtp"]

            async with Client(gateway.mcp_url) as client:
                queued = (await client.call_tool("sendemail", SAMPLE_CALL)).structured_content
                assert queued["status"] == "queued"

                sink.up()
                sink.wait_for(2, timeout=30)
                status = "queued"
                for _ in range(100):  # the outcome is recorded just after the server took the message
                    answer = await client.call_tool("get_email_status", {"email_id": queued["email_id"]})
                    status = answer.structured_content["status"]
                    if status != "queued":
                        break
                    await asyncio.sleep(0.1)
            assert status == "sent"
            wait_for(
                lambda: httpx2.get(f"{gateway.url}/readyz", timeout=10).status_code == 200,
                message="/readyz to report ready once the SMTP server is up",
            )
    finally:
        sink.stop()
