"""Never lose an escalation, never send one twice: real faults at a real SMTP sink (and a fake ACS).

The gateway runs as a real process (`escalation-comms serve`) with the smtp transport
pointed at an aiosmtpd sink that refuses, stalls, disappears, or is cut off by SIGKILL,
or with the acs transport pointed at the fake ACS service. Nothing here waits "long
enough" for something not to happen: a test that counts what was sent first stops the
gateway gracefully, so every send it would have made has been made.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trustme
from mcp import Client
from mcp_types import CallToolResult

from gateway.dispatcher import now_utc
from gateway.store import DeliveryRecord, Store
from tests.fake_acs import Answer, FakeAcs
from tests.smtp_sink import SMTPSink
from tests.support import SAMPLE_CALL, GatewayProcess, deep_merge
from tests.test_store import accept as store_accept

pytestmark = pytest.mark.anyio

#: fast retries and short leases so faults heal within a test's patience
QUICK: dict[str, Any] = {
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


def database_url(site: Path) -> str:
    return f"sqlite:///{site.parent / 'gateway.db'}"


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


async def recorded_deliveries(site: Path) -> list[DeliveryRecord]:
    store = await Store.open(database_url(site))
    try:
        found = []
        for status in ("queued", "sent", "delivered", "failed"):
            found += await store.list_deliveries(status, limit=100_000)
        return found
    finally:
        await store.close()


async def eventually(
    probe: Callable[[], Awaitable[Any]], what: str, within: float = 60.0, interval: float = 0.05
) -> Any:
    """Await `probe()` until it returns something true; a bound on waiting, not a speed assertion."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


async def settled(site: Path, expected: int, within: float = 60.0) -> list[DeliveryRecord]:
    """The store's deliveries once `expected` are recorded and none is queued any more."""

    async def probe() -> list[DeliveryRecord] | None:
        rows = await recorded_deliveries(site)
        return rows if len(rows) >= expected and all(d.status != "queued" for d in rows) else None

    return await eventually(probe, f"{expected} deliveries to leave the queue", within, interval=0.3)


async def until_everything_accepted_is_recorded_sent(site: Path, sink: SMTPSink) -> None:
    """Wait until every message the sink accepted is recorded `sent` in the store.

    Call it once the sink refuses everything: then no message can be accepted by the sink but
    not yet recorded by the gateway, which is what makes a kill right afterwards a fair test.
    """
    store = await Store.open(database_url(site))
    try:

        async def probe() -> bool:
            sent = {d.message_id for d in await store.list_deliveries("sent", limit=100_000)}
            return set(sink.message_ids()) <= sent

        await eventually(probe, "every message the sink accepted to be recorded sent")
    finally:
        await store.close()


def forget_connections(sink: SMTPSink) -> None:
    """Drop every connection the sink holds (a quick restart on the same port).

    After a SIGKILL, what the dead process already wrote may still sit unread at the sink.
    Once those connections are gone (aiosmtpd stops reading a connection when it closes),
    nothing the dead process sent can be accepted later.
    """
    sink.down()
    sink.up()


def leased_in_flight(site: Path) -> int:
    """Deliveries recorded, leased by a process, and not yet sent: a send is in flight."""
    uri = f"file:{site.parent / 'gateway.db'}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
        row = db.execute(
            "SELECT count(*) FROM deliveries WHERE status = 'queued' AND lease_owner IS NOT NULL"
        ).fetchone()
    return int(row[0])


async def sendemail_across_shutdown(url: str, args: dict[str, str]) -> CallToolResult | Exception:
    """One sendemail call that may outlive the server's listener: its result, or what went wrong.

    The client checks a result against the tool's output schema, fetching the tool list first if
    it has not yet; fetched up front, nothing needs a new connection once the server stops listening.
    """
    result: CallToolResult | None = None
    try:
        async with Client(url) as client:
            await client.list_tools()
            result = await client.call_tool("sendemail", args)
    except Exception as err:  # closing the session of a server that has gone away may fail too
        if result is None:
            return err
    assert result is not None
    return result


async def until_in_flight(site: Path, call: asyncio.Task[Any]) -> None:
    """Wait until the call's two deliveries are recorded and being sent (leased, not yet sent)."""

    async def probe() -> bool:
        if call.done():
            raise AssertionError(f"the call ended before it was interrupted: {call.result()}")
        return await asyncio.to_thread(leased_in_flight, site) == 2

    await eventually(probe, "both deliveries to be recorded and in flight")


def refuses_connections(url: str) -> bool:
    try:
        httpx2.get(f"{url}/healthz", timeout=2)
    except httpx2.ConnectError:
        return True
    except httpx2.HTTPError:
        pass
    return False


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
        assert result.structured_content["status"] == "partial"
    # Stopped gracefully: any retry the background dispatcher would make has been made by now.
    rows = {d.role: d for d in await recorded_deliveries(site)}
    customer, team = rows["customer"], rows["bank_team"]
    assert (customer.status, customer.attempts) == ("failed", 1)
    assert customer.last_error is not None and "550" in customer.last_error
    assert (team.status, team.attempts) == ("sent", 1)
    assert [m.recipients for m in sink.messages] == [("support@bankx.com",)]


async def test_concurrent_identical_calls_send_once(site: Path, sink: SMTPSink) -> None:
    with gateway(site, sink) as server:
        results = await escalate(server.mcp_url, [call_for(7)] * 12, concurrency=12)
    data = [r.structured_content for r in results]
    assert len({d["email_id"] for d in data}) == 1
    assert sum(not d["replay"] for d in data) == 1
    # The gateway has stopped gracefully: a second send, had there been one, has been made.
    assert len(await recorded_deliveries(site)) == 2
    assert sorted(sink.message_ids()) == sorted(d["message_id"] for d in data[0]["deliveries"])


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
        rows = await settled(site, 1000, within=120)
    # Stopped gracefully after the queue emptied: anything extra would have been sent by now.
    assert all(d.status == "sent" for d in rows)
    ids = sink.message_ids()
    assert len(ids) == 1000 and len(set(ids)) == 1000
    expected = {d["message_id"] for r in results for d in r.structured_content["deliveries"]}
    assert set(ids) == expected == {d.message_id for d in rows}


async def test_kill_9_mid_burst_loses_no_recorded_delivery(site: Path, sink: SMTPSink) -> None:
    calls = [call_for(n) for n in range(80)]
    with gateway(site, sink) as first:
        burst = asyncio.create_task(escalate(first.mcp_url, calls, concurrency=8))
        try:
            await asyncio.to_thread(sink.wait_for, 40, 60)
            # Refuse everything around the kill, and kill only once each message the sink took is
            # recorded: no message can be accepted by the sink but not recorded by the gateway.
            sink.fail_fraction(1.0, seed=1)
            await until_everything_accepted_is_recorded_sent(site, sink)
            first.kill()
            forget_connections(sink)
            sink.fail_fraction(0.0)
            await asyncio.wait_for(burst, timeout=120)
        finally:
            if not burst.done():
                burst.cancel()

    with gateway(site, sink) as second:
        rows = await settled(site, 1)
        assert second.stop() in (0, -signal.SIGTERM), second.logs()  # gracefully: in-flight sends land
    counts = Counter(sink.message_ids())
    assert all(d.status == "sent" for d in rows)
    assert {d.message_id for d in rows} == set(counts)  # every recorded delivery arrived...
    assert max(counts.values()) == 1  # ...exactly once
    assert len(rows) >= 40


#: SIGTERM while a send is stuck in DATA: each stuck attempt gives up after 2 s and is tried again
#: on a new connection, and the email deadline (20 s) is far away, so only the sink decides
#: when the call can finish; shutdown grants 10 s to what is in flight.
STALLED_BUT_FINISHING = deep_merge(
    QUICK,
    {
        "email": {"timeout_seconds": 20, "retry_count": 20},
        "transports": {"smtp": {"command_timeout_seconds": 2}},
        "server": {"shutdown_grace_seconds": 10},
    },
)


async def test_sigterm_refuses_new_connections_and_lets_the_inflight_call_finish_sent(
    config_factory: Callable[..., Path], sink: SMTPSink
) -> None:
    site = config_factory(STALLED_BUT_FINISHING)
    sink.stall("data")  # every send hangs in DATA until the sink is un-stalled
    server = gateway(site, sink)
    with server:
        call = asyncio.create_task(sendemail_across_shutdown(server.mcp_url, call_for(1)))
        try:
            await until_in_flight(site, call)
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            await eventually(
                lambda: asyncio.to_thread(refuses_connections, server.url),
                "the server to stop listening after SIGTERM",
                within=20,
            )
            assert not call.done(), "the call ended before the sink let it finish"
            assert sink.messages == []
            sink.stall(None)  # the sink answers again: the in-flight call can now finish
            result = await asyncio.wait_for(call, timeout=60)
        finally:
            if not call.done():
                call.cancel()
        code = await asyncio.to_thread(server.proc.wait, 60)
    assert not isinstance(result, Exception), result
    data = result.structured_content
    assert data is not None and data["status"] == "sent", data
    assert all(d["status"] == "sent" for d in data["deliveries"])
    assert code in (0, -signal.SIGTERM), server.logs()  # uvicorn re-raises the signal it handled
    assert "Traceback" not in server.logs()
    assert "still being sent at shutdown" not in server.logs()

    # After a restart nothing goes out again: the store says sent, and so does the sink, once each.
    with gateway(site, sink) as again:
        async with Client(again.mcp_url) as client:
            status = await wait_for_status(client, data["email_id"], "sent")
    assert [d["message_id"] for d in status["deliveries"]] == [d["message_id"] for d in data["deliveries"]]
    counts = Counter(sink.message_ids())
    assert sorted(counts) == sorted(d["message_id"] for d in data["deliveries"])
    assert set(counts.values()) == {1}


#: SIGTERM while a send is stuck in DATA for longer than the grace period (1 s): the stuck
#: attempt would wait 30 s for the server, the email deadline is 8 s away.
STALLED_BEYOND_THE_GRACE = deep_merge(
    QUICK,
    {"email": {"timeout_seconds": 8, "retry_count": 3}, "server": {"shutdown_grace_seconds": 1}},
)


async def test_sigterm_leaves_what_could_not_finish_pending_and_the_next_start_sends_it(
    config_factory: Callable[..., Path], sink: SMTPSink
) -> None:
    site = config_factory(STALLED_BEYOND_THE_GRACE)
    sink.stall("data")
    server = gateway(site, sink)
    with server:
        call = asyncio.create_task(sendemail_across_shutdown(server.mcp_url, call_for(1)))
        try:
            await until_in_flight(site, call)
            code = await asyncio.to_thread(server.stop, signal.SIGTERM, 60)
            await asyncio.wait_for(call, timeout=60)
        finally:
            if not call.done():
                call.cancel()
    assert code in (0, -signal.SIGTERM), server.logs()
    assert "timeout graceful shutdown exceeded" in server.logs()  # the grace period cut it, not a deadline
    rows = await recorded_deliveries(site)
    assert len(rows) == 2 and all(d.status == "queued" for d in rows)  # not lost: pending
    # ...and given back: the next start need not wait for the stopped process's leases to expire.
    assert await asyncio.to_thread(leased_in_flight, site) == 0
    assert sink.messages == []

    sink.stall(None)
    with gateway(site, sink):
        received = await asyncio.to_thread(sink.wait_for, 2, 60)
        rows = await settled(site, 2)
    assert sorted(m.message_id for m in received) == sorted(d.message_id for d in rows)
    assert all(d.status == "sent" for d in rows)
    assert Counter(sink.message_ids()) == Counter({d.message_id: 1 for d in rows})


async def test_a_call_cancelled_mid_send_gives_its_leases_back_and_the_dispatcher_sends_at_once(
    running_gateway: Callable[..., Any], sink: SMTPSink
) -> None:
    # Leases of 60 s (the email deadline plus the margin): far longer than this test waits.
    patch = deep_merge(
        QUICK,
        {
            "email": {"timeout_seconds": 30},
            "dispatcher": {"lease_margin_seconds": 30},
            "transports": {"smtp": sink.settings()},
        },
    )
    sink.stall("data")
    async with running_gateway(patch, env={"EMAIL_TRANSPORT": "smtp"}) as server:
        site = server.settings.base_dir / "config.yaml"
        call = asyncio.create_task(server.service.sendemail(**call_for(1)))
        await until_in_flight(site, call)
        call.cancel()  # the caller went away (an MCP cancellation) while both sends hang in DATA
        with pytest.raises(asyncio.CancelledError):
            await call
        sink.stall(None)
        received = await asyncio.to_thread(sink.wait_for, 2, 20)
        rows = await settled(site, 2, within=20)
    assert all(d.status == "sent" for d in rows)
    assert Counter(m.message_id for m in received) == Counter({d.message_id: 1 for d in rows})


async def test_an_outcome_still_waiting_for_the_store_at_shutdown_is_written_not_given_back(
    running_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_gateway({"server": {"shutdown_grace_seconds": 0}}) as server:
        store, outbox = server.store, server.transports["file"].directory
        record = store.record

        async def slow_record(outcomes: Any, owner: str) -> list[str]:
            await asyncio.sleep(0.5)  # a busy database: the outcome waits while shutdown begins
            return await record(outcomes, owner)

        monkeypatch.setattr(store, "record", slow_record)
        call = asyncio.create_task(server.service.sendemail(**call_for(1)))
        await eventually(
            lambda: asyncio.to_thread(lambda: len(list(outbox.glob("*.eml"))) == 2), "both emails"
        )
    # The stop cut the call off while both outcomes waited to be written: they are written all the
    # same, and the leases are not handed back as if nothing had been sent (which sends them again).
    with pytest.raises(asyncio.CancelledError):
        await call
    reopened = await Store.open(server.settings.store.database_url)
    try:
        sent, queued = await reopened.list_deliveries("sent"), await reopened.list_deliveries("queued")
    finally:
        await reopened.close()
    assert (len(sent), queued) == (2, [])


async def test_a_failing_retention_round_never_stops_the_sending(
    running_gateway: Callable[..., Any],
    settings_factory: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    patch = {"store": {"retention_days": 30}}
    # An escalation a dead process accepted ten minutes ago: its lease is long over, so only the
    # background dispatcher can send it.
    earlier = await Store.open(settings_factory(patch).store.database_url)
    try:
        accepted = await store_accept(
            earlier, "TKT-ORPHAN", owner="dead", at=now_utc() - timedelta(minutes=10)
        )
    finally:
        await earlier.close()
    async with running_gateway(patch, background=False) as server:

        async def failing_scrub(*args: Any, **kwargs: Any) -> int:
            raise RuntimeError("the retention query failed")

        monkeypatch.setattr(server.store, "scrub", failing_scrub)
        server.dispatcher.start()

        async def sent() -> bool:
            record = await server.store.load(accepted.record.email_id)
            return record is not None and {d.status for d in record.deliveries} == {"sent"}

        await eventually(sent, "the orphaned escalation to be sent by the background dispatcher")
    assert "retention round failed" in caplog.text


# -- what bounds the retrying ---------------------------------------------------------------------


@pytest.fixture
def fake_acs(tmp_path: Path) -> Iterator[FakeAcs]:
    with FakeAcs(tmp_path / "acs", trustme.CA()) as service:
        yield service


async def test_the_dispatcher_waits_as_long_as_retry_after_says_before_retrying(
    site: Path, fake_acs: FakeAcs
) -> None:
    customer = SAMPLE_CALL["customer_email"]
    fake_acs.fail_sends(Answer(429, retry_after=2, recipient=customer))
    env = {"EMAIL_TRANSPORT": "acs", "EMAIL_TIMEOUT_SECONDS": "30", **fake_acs.environment()}
    with GatewayProcess(site, env=env) as server:
        [result] = await escalate(server.mcp_url, [SAMPLE_CALL])
    data = result.structured_content
    assert data["status"] == "sent", data
    delivery = next(d for d in data["deliveries"] if d["role"] == "customer")
    assert (delivery["status"], delivery["attempts"]) == ("sent", 2)
    operation = delivery["message_id"].strip("<>").split("@")[0]  # the delivery id is the operation id
    first, retry = [s for s in fake_acs.sends() if s.operation_id == operation]
    assert (first.status, retry.status) == (429, 202)
    # Exponential backoff alone would retry after a quarter of a second.
    assert retry.at - first.at >= 1.9, retry.at - first.at


async def test_a_delivery_still_failing_at_the_retry_horizon_is_failed_saying_it_gave_up(
    config_factory: Callable[..., Path], sink: SMTPSink
) -> None:
    site = config_factory(deep_merge(QUICK, {"email": {"retry_horizon_hours": 0.0005}}))  # 1.8 s
    sink.down()
    with gateway(site, sink) as server:
        [result] = await escalate(server.mcp_url, [call_for(1)])
        async with Client(server.mcp_url) as client:
            status = await wait_for_status(client, result.structured_content["email_id"], "failed", 60)
    for delivery in status["deliveries"]:
        assert delivery["status"] == "failed"
        gave_up = re.match(r"gave up after (\d+) attempts: ", delivery["error"])
        assert gave_up, delivery["error"]
        assert int(gave_up[1]) == delivery["attempts"] >= 3
    assert sink.messages == []


async def test_email_timeout_seconds_ends_a_call_against_a_stalled_server_with_queued(
    site: Path, sink: SMTPSink
) -> None:
    sink.stall("data")  # the server takes the message and never answers; SMTP's own wait is 30 s
    with gateway(site, sink, EMAIL_TIMEOUT_SECONDS="2") as server:
        # A generous bound: the call must return at all, and before the 30 s per-command wait.
        async with asyncio.timeout(25):
            [result] = await escalate(server.mcp_url, [call_for(1)])
        sink.stall(None)
    assert not isinstance(result, Exception), result
    data = result.structured_content
    assert data["status"] == "queued", data
    assert all(d["status"] == "queued" for d in data["deliveries"])
    assert all("did not answer within" in d["error"] for d in data["deliveries"]), data
