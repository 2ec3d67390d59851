"""Never lose an escalation, never send one twice: real faults at a real SMTP sink.

The gateway runs as a real process (`escalation-comms serve`) with the smtp transport
pointed at an aiosmtpd sink that refuses, disappears, or is cut off by SIGKILL.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from gateway.store import Store
from tests.smtp_sink import SMTPSink
from tests.support import SAMPLE_CALL, GatewayProcess

pytestmark = pytest.mark.anyio

#: fast retries and short leases so faults heal within a test's patience
QUICK = {
    "email": {"timeout_seconds": 3, "retry_count": 3},
    "dispatcher": {
        "poll_interval_seconds": 0.2,
        "max_backoff_seconds": 0.5,
        "lease_margin_seconds": 1,
        "first_status_check_seconds": 0.2,
    },
}


def call_for(n: int, **changes: str) -> dict[str, str]:
    return {
        **SAMPLE_CALL,
        "ticket_id": f"TKT-2025-{n:06d}",
        "customer_email": f"customer{n}@example.com",
        **changes,
    }


@pytest.fixture
def sink() -> Iterator[SMTPSink]:
    with SMTPSink() as running:
        yield running


@pytest.fixture
def site(config_factory: Callable[..., Path]) -> Path:
    return config_factory(QUICK)


def gateway(site: Path, sink: SMTPSink, **env: str) -> GatewayProcess:
    return GatewayProcess(site, env={"EMAIL_TRANSPORT": "smtp", **sink.env(), **env})


async def escalate(url: str, calls: list[dict[str, str]], concurrency: int = 16) -> list[Any]:
    """Send `calls` over `concurrency` MCP sessions; results (or exceptions) in order."""
    results: list[Any] = [None] * len(calls)
    queue = list(enumerate(calls))

    async def worker() -> None:
        async with Client(url) as client:
            while queue:
                index, args = queue.pop(0)
                try:
                    results[index] = await client.call_tool("sendemail", args)
                except Exception as err:  # a killed server: the call's fate is decided by the store
                    results[index] = err

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(calls)))), return_exceptions=True)
    return results


async def recorded_deliveries(site: Path) -> list[Any]:
    store = await Store.open(f"sqlite:///{site.parent / 'gateway.db'}")
    try:
        found = []
        for status in ("queued", "sent", "delivered", "failed"):
            found += await store.list_deliveries(status, limit=100_000)
        return found
    finally:
        await store.close()


async def test_transient_refusals_are_retried_inside_the_call(site: Path, sink: SMTPSink) -> None:
    sink.fail_next(2, code=451)
    with gateway(site, sink) as server:
        [result] = await escalate(server.mcp_url, [call_for(1)])
    data = result.structured_content
    assert data["status"] == "sent"
    assert sum(d["attempts"] for d in data["deliveries"]) == 4  # two refusals, each retried
    assert len(sink.messages) == 2 and sink.attempts == 4


async def test_a_sink_that_is_down_gets_the_emails_once_it_is_back(site: Path, sink: SMTPSink) -> None:
    sink.down()
    with gateway(site, sink) as server:
        [result] = await escalate(server.mcp_url, [call_for(1)])
        data = result.structured_content
        assert data["status"] == "queued"
        assert all(d["status"] == "queued" and d["error"] for d in data["deliveries"])
        sink.up()
        received = sink.wait_for(2, timeout=20)
        async with Client(server.mcp_url) as client:
            status = await wait_for_status(client, data["email_id"], "sent")
    assert sorted(m.message_id for m in received) == sorted(d["message_id"] for d in data["deliveries"])
    assert all(d["attempts"] > 3 for d in status["deliveries"])


async def wait_for_status(client: Client, email_id: str, wanted: str, patience: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + patience
    while True:
        status = (await client.call_tool("get_email_status", {"email_id": email_id})).structured_content
        if status["status"] == wanted or time.monotonic() > deadline:
            assert status["status"] == wanted, status
            return status
        await asyncio.sleep(0.2)


async def test_permanent_refusal_is_not_retried(site: Path, sink: SMTPSink) -> None:
    sink.refuse_recipient("customer1@example.com", code=550)
    with gateway(site, sink) as server:
        [result] = await escalate(server.mcp_url, [call_for(1)])
        await asyncio.sleep(1.0)  # the background dispatcher would have retried by now
        async with Client(server.mcp_url) as client:
            status = await wait_for_status(client, result.structured_content["email_id"], "partial")
    customer, team = status["deliveries"]
    assert (customer["status"], customer["attempts"]) == ("failed", 1)
    assert "550" in customer["error"]
    assert team["status"] == "sent"
    assert [m.recipients for m in sink.messages] == [("support@bankx.com",)]


async def test_concurrent_identical_calls_send_once(site: Path, sink: SMTPSink) -> None:
    with gateway(site, sink) as server:
        results = await escalate(server.mcp_url, [call_for(7)] * 12, concurrency=12)
    data = [r.structured_content for r in results]
    assert len({d["email_id"] for d in data}) == 1
    assert sum(not d["replay"] for d in data) == 1
    await asyncio.sleep(0.5)  # a second send, if there were one, would have arrived
    assert len(sink.messages) == 2


async def test_per_recipient_cap_refuses_a_looping_agent(
    config_factory: Callable[..., Path], sink: SMTPSink
) -> None:
    site = config_factory({**QUICK, "email": {**QUICK["email"], "per_recipient_hourly_cap": 3}})
    same_customer = [call_for(n, customer_email="loop@example.com") for n in range(5)]
    with gateway(site, sink) as server:
        results = await escalate(server.mcp_url, same_customer, concurrency=1)
        replay = (await escalate(server.mcp_url, [same_customer[0]]))[0]
    assert [r.is_error for r in results] == [False, False, False, True, True]
    assert "customer_email" in results[3].content[0].text and "limit 3" in results[3].content[0].text
    assert replay.structured_content["replay"] is True  # a replay sends nothing, so it is never capped
    assert len(sink.messages) == 6


async def test_rate_limit_queues_instead_of_failing(
    config_factory: Callable[..., Path], sink: SMTPSink
) -> None:
    site = config_factory(
        {
            **QUICK,
            "email": {"timeout_seconds": 1, "retry_count": 3},
            "transports": {"smtp": {"rate_limits": ["2/3 seconds"]}},
        }
    )
    with gateway(site, sink) as server:
        started = time.monotonic()
        first, second = await escalate(server.mcp_url, [call_for(1), call_for(2)], concurrency=1)
        assert first.structured_content["status"] == "sent"
        assert second.structured_content["status"] == "queued"
        assert all("rate limit" in d["error"] for d in second.structured_content["deliveries"])
        assert len(sink.messages) == 2  # the second escalation waits for the window, it did not fail
        sink.wait_for(4, timeout=15)
        assert time.monotonic() - started >= 2.5  # two per three seconds: the window was honoured


async def test_thirty_percent_refusals_500_escalations_all_delivered_once(site: Path, sink: SMTPSink) -> None:
    sink.fail_fraction(0.3, seed=42)
    calls = [call_for(n) for n in range(500)]
    with gateway(site, sink) as server:
        results = await escalate(server.mcp_url, calls, concurrency=16)
        assert all(not r.is_error for r in results)
        sink.wait_for(1000, timeout=120)
        await asyncio.sleep(1.0)  # anything extra would arrive now
    ids = sink.message_ids()
    assert len(ids) == 1000 and len(set(ids)) == 1000
    expected = {d["message_id"] for r in results for d in r.structured_content["deliveries"]}
    assert set(ids) == expected


async def test_kill_9_mid_burst_loses_no_recorded_delivery(site: Path, sink: SMTPSink) -> None:
    calls = [call_for(n) for n in range(80)]
    first = gateway(site, sink).start()
    burst = asyncio.create_task(escalate(first.mcp_url, calls, concurrency=8))
    await asyncio.to_thread(sink.wait_for, 40, 60)
    # Refuse everything around the kill: no message can be accepted by the sink but not yet recorded.
    sink.fail_fraction(1.0, seed=1)
    await asyncio.sleep(0.5)
    first.stop(signal.SIGKILL)
    await burst
    sink.fail_fraction(0.0)

    with gateway(site, sink):

        async def settled() -> list[Any]:
            while True:
                rows = await recorded_deliveries(site)
                if rows and all(d.status != "queued" for d in rows):
                    return rows
                await asyncio.sleep(0.3)

        rows = await asyncio.wait_for(settled(), timeout=60)
        await asyncio.sleep(0.5)
    counts = Counter(sink.message_ids())
    assert all(d.status == "sent" for d in rows)
    assert {d.message_id for d in rows} == set(counts)  # every recorded delivery arrived...
    assert max(counts.values()) == 1  # ...exactly once
    assert len(rows) >= 40


async def test_sigterm_lets_inflight_sends_finish_and_leaves_the_rest_pending(
    site: Path, sink: SMTPSink
) -> None:
    sink.stall("data")  # every send hangs until the gateway gives up
    server = gateway(site, sink).start()
    calls = asyncio.create_task(escalate(server.mcp_url, [call_for(1)]))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    code = await asyncio.to_thread(server.stop, signal.SIGTERM, 30)
    assert code in (0, -signal.SIGTERM), server.logs()  # uvicorn re-raises the signal it handled
    assert "Traceback" not in server.logs()
    assert time.monotonic() - started < 15  # grace period (10 s) plus start-up margin
    await calls
    rows = await recorded_deliveries(site)
    assert len(rows) == 2 and all(d.status == "queued" for d in rows)

    sink.stall(None)
    with gateway(site, sink):
        received = sink.wait_for(2, timeout=30)
    assert sorted(m.message_id for m in received) == sorted(d.message_id for d in rows)
