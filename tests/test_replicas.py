"""Several gateway replicas sharing one PostgreSQL: the database decides, never a process.

Each test starts real `escalation-comms serve` processes on their own ports, all with the
same config and DATABASE_URL (a fresh PostgreSQL database per test), all sending through
the smtp transport to one shared aiosmtpd sink, and drives them with the real MCP client.
Without TEST_DATABASE_URL the tests skip (see `fresh_postgres_url` in conftest.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp_types import CallToolResult
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.store import DeliveryRecord, NewDelivery, Store
from gateway.store.schema import SCHEMA_VERSION, deliveries, escalations, schema_version
from gateway.store.store import MIGRATION_LOCK
from gateway.transport import OutgoingMessage
from tests.smtp_sink import SMTPSink
from tests.support import SAMPLE_CALL, GatewayProcess, deep_merge, free_port

pytestmark = pytest.mark.anyio

#: replicas behind a load balancer, with short deadlines and leases so takeovers happen within a test
REPLICA_CONFIG: dict[str, Any] = {
    "server": {"stateless_http": True, "json_response": True, "shutdown_grace_seconds": 2},
    "email": {"timeout_seconds": 2, "retry_count": 3},
    "dispatcher": {
        "poll_interval_seconds": 0.2,
        "max_backoff_seconds": 0.5,
        "lease_margin_seconds": 2,
        "first_status_check_seconds": 0.2,
    },
}
EMAIL_ID = re.compile(r"^EMAIL-(?P<use_case>UC\d+)-(?P<day>\d{8})-(?P<number>\d{3,})$")


@dataclass
class Cluster:
    database_url: str
    replicas: list[GatewayProcess]

    @property
    def urls(self) -> list[str]:
        return [r.mcp_url for r in self.replicas]

    def start(self) -> None:
        """Start every replica at the same moment; return once all are healthy."""
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(GatewayProcess.start, self.replicas))

    def logs(self) -> str:
        return "\n".join(r.logs() for r in self.replicas)


@pytest.fixture
def sink() -> Iterator[SMTPSink]:
    with SMTPSink() as running:
        yield running


@pytest.fixture
def cluster(
    config_factory: Callable[..., Path], fresh_postgres_url: str, sink: SMTPSink
) -> Iterator[Callable[..., Cluster]]:
    """`cluster(n, patch)`: n replicas on one fresh database, started at the same moment."""
    started: list[GatewayProcess] = []

    def make(n: int = 3, patch: dict[str, Any] | None = None, *, start: bool = True) -> Cluster:
        site = config_factory(deep_merge(REPLICA_CONFIG, patch or {}))
        env = {"EMAIL_TRANSPORT": "smtp", "DATABASE_URL": fresh_postgres_url, **sink.env()}
        made = Cluster(fresh_postgres_url, [GatewayProcess(site, env=env) for _ in range(n)])
        started.extend(made.replicas)
        if start:
            made.start()
        return made

    yield make
    for replica in started:
        replica.stop()


def call_for(n: int, **changes: str) -> dict[str, str]:
    return {
        **SAMPLE_CALL,
        "ticket_id": f"TKT-2025-{n:06d}",
        "customer_email": f"customer{n}@example.com",
        "use_case": "UC2" if n % 2 else "UC3",
        **changes,
    }


async def call(url: str, tool: str, args: dict[str, Any]) -> CallToolResult:
    """One tool call on a fresh MCP session, as a caller behind a load balancer would make it."""
    async with asyncio.timeout(30), Client(url) as client:
        return await client.call_tool(tool, args)


@asynccontextmanager
async def sessions(urls: Sequence[str]) -> AsyncIterator[list[Client]]:
    """One MCP client session per replica, kept open (calls on one session may run concurrently)."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Client(url)) for url in urls]


def data(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def error_text(result: CallToolResult) -> str:
    assert result.is_error
    return " ".join(getattr(part, "text", "") for part in result.content)


def engine_of(store: Store) -> AsyncEngine:
    assert store.engine is not None, "a PostgreSQL store has an async engine"
    return store.engine


async def recorded(database_url: str) -> tuple[list[dict[str, Any]], list[DeliveryRecord]]:
    """Every escalation row and every delivery, read straight from the shared store."""
    store = await Store.open(database_url)
    try:
        async with engine_of(store).connect() as conn:
            rows = [dict(r._mapping) for r in await conn.execute(select(escalations))]
        found: list[DeliveryRecord] = []
        for status in ("queued", "sent", "delivered", "failed"):
            found += await store.list_deliveries(status, limit=100_000)
        return rows, found
    finally:
        await store.close()


def assert_sequential_per_day(email_ids: Sequence[str]) -> None:
    """Unique, and numbered 1..n without a gap within each use case and day."""
    assert len(set(email_ids)) == len(email_ids), Counter(email_ids).most_common(3)
    numbers: dict[tuple[str, str], list[int]] = defaultdict(list)
    for email_id in email_ids:
        match = EMAIL_ID.match(email_id)
        assert match, email_id
        numbers[(match["use_case"], match["day"])].append(int(match["number"]))
    for key, found in numbers.items():
        assert sorted(found) == list(range(1, len(found) + 1)), (key, sorted(found))


async def settled(database_url: str, expected: int, within: float = 60.0) -> list[DeliveryRecord]:
    """Wait until `expected` deliveries are recorded and none is still queued."""
    deadline = time.monotonic() + within
    while True:
        _, rows = await recorded(database_url)
        if len(rows) >= expected and all(d.status != "queued" for d in rows):
            return rows
        if time.monotonic() > deadline:
            pending = Counter(d.status for d in rows)
            raise AssertionError(f"deliveries did not settle within {within}s: {dict(pending)}")
        await asyncio.sleep(0.3)


def stop_gracefully(cluster: Cluster) -> None:
    """SIGTERM every replica and wait: in-flight sends land, so counting at the sink is final."""
    for replica in cluster.replicas:
        assert replica.stop() in (0, -signal.SIGTERM), replica.logs()


def assert_clean(cluster_logs: str) -> None:
    assert "Traceback" not in cluster_logs
    assert "was lost before its outcome was recorded" not in cluster_logs


# -- start-up ------------------------------------------------------------------------------------


async def test_replicas_starting_together_on_an_empty_database_create_the_schema_once(
    cluster: Callable[..., Cluster],
) -> None:
    replicas = cluster(3, start=False)
    # Hold the migration lock while they start, so all three queue up to migrate at the same moment.
    holder = await asyncpg.connect(replicas.database_url)
    try:
        await holder.execute(f"SELECT pg_advisory_lock({MIGRATION_LOCK})")
        starting = asyncio.create_task(asyncio.to_thread(replicas.start))
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        waiting += "AND wait_event_type = 'Lock' AND query LIKE '%pg_advisory_xact_lock%'"
        deadline = time.monotonic() + 60
        while await holder.fetchval(waiting) < 3:
            assert time.monotonic() < deadline and not starting.done(), "replicas did not wait to migrate"
            await asyncio.sleep(0.05)
        await holder.execute(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
        await starting
    finally:
        await holder.close()

    for replica in replicas.replicas:
        ready = httpx2.get(f"{replica.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
    assert_clean(replicas.logs())
    assert not re.search(r"^\S+ +(ERROR|CRITICAL) ", replicas.logs(), re.MULTILINE), replicas.logs()
    store = await Store.open(replicas.database_url)
    try:
        async with engine_of(store).connect() as conn:
            versions = list(await conn.execute(select(schema_version.c.id, schema_version.c.version)))
    finally:
        await store.close()
    assert versions == [(1, SCHEMA_VERSION)]
    # ...and the schema they made works for every one of them.
    results = await asyncio.gather(
        *(call(url, "sendemail", call_for(n)) for n, url in enumerate(replicas.urls))
    )
    assert [data(r)["status"] for r in results] == ["sent"] * 3


# -- email_id numbering and idempotency ----------------------------------------------------------


async def test_email_ids_stay_unique_and_sequential_when_replicas_number_them_concurrently(
    cluster: Callable[..., Cluster], sink: SMTPSink
) -> None:
    replicas = cluster(3)
    calls = [call_for(n) for n in range(48)]
    async with sessions(replicas.urls) as clients:
        results = [
            data(r)
            for r in await asyncio.gather(
                *(clients[n % 3].call_tool("sendemail", args) for n, args in enumerate(calls))
            )
        ]
    email_ids = [r["email_id"] for r in results]
    assert_sequential_per_day(email_ids)
    assert {EMAIL_ID.match(e)["use_case"] for e in email_ids} == {"UC2", "UC3"}  # type: ignore[index]
    rows, _ = await recorded(replicas.database_url)
    assert {r["ticket_id"]: r["email_id"] for r in rows} == {
        c["ticket_id"]: e for c, e in zip(calls, email_ids, strict=True)
    }
    sink.wait_for(96, timeout=30)


async def test_the_same_call_sent_to_every_replica_at_once_is_recorded_once(
    cluster: Callable[..., Cluster], sink: SMTPSink
) -> None:
    replicas = cluster(3)
    tickets = [call_for(n) for n in range(8)]
    async with sessions(replicas.urls * 2) as clients:
        results = await asyncio.gather(
            *(client.call_tool("sendemail", args) for args in tickets for client in clients)
        )
    by_ticket: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by_ticket[data(result)["ticket_id"]].append(data(result))
    for ticket, answers in by_ticket.items():
        assert len({a["email_id"] for a in answers}) == 1, ticket  # every replica answered the same id
        assert sum(not a["replay"] for a in answers) == 1, ticket  # and exactly one of them sent
    rows = await settled(replicas.database_url, 16)
    stop_gracefully(replicas)  # whatever a replica would still send has been sent
    assert sorted(sink.message_ids()) == sorted(d.message_id for d in rows)


async def test_recipient_cap_holds_when_replicas_escalate_for_one_customer_at_once(
    cluster: Callable[..., Cluster], sink: SMTPSink
) -> None:
    replicas = cluster(3, {"email": {"per_recipient_hourly_cap": 3}})
    looping = [call_for(n, customer_email="loop@example.com") for n in range(6)]
    # Each ticket goes to two replicas at once; all twelve calls race for the last slots.
    sent = [(args, replicas.urls[(n + k) % 3]) for n, args in enumerate(looping) for k in range(2)]
    results = await asyncio.gather(*(call(url, "sendemail", args) for args, url in sent))
    outcome: dict[str, list[CallToolResult]] = defaultdict(list)
    for (args, _), result in zip(sent, results, strict=True):
        outcome[args["ticket_id"]].append(result)
    accepted = {t for t, rs in outcome.items() if not any(r.is_error for r in rs)}
    refused = {t for t, rs in outcome.items() if all(r.is_error for r in rs)}
    assert len(accepted) == 3 and len(refused) == 3  # both calls of a ticket share its fate
    for ticket in accepted:
        answers = [data(r) for r in outcome[ticket]]
        assert len({a["email_id"] for a in answers}) == 1
        assert sorted(a["replay"] for a in answers) == [False, True]  # the twin is a replay, never capped
    for ticket in refused:
        assert all("limit 3" in error_text(r) for r in outcome[ticket])
    await settled(replicas.database_url, 6)
    stop_gracefully(replicas)
    customer_copies = [m for m in sink.messages if m.recipients == ("loop@example.com",)]
    assert len(customer_copies) == 3


# -- the shared outbox ---------------------------------------------------------------------------


def new_deliveries(ticket: str, at: datetime) -> list[NewDelivery]:
    made = []
    for role, to in (("customer", f"{ticket.lower()}@example.com"), ("bank_team", "support@bankx.com")):
        delivery_id = str(uuid.uuid4())
        message = OutgoingMessage(
            delivery_id=delivery_id,
            message_id=f"<{delivery_id}@bankx.com>",
            sender="noreply@bankx.com",
            recipients=(to,),
            subject=ticket,
            text="text",
            html="<p>html</p>",
            date=at,
            headers={"X-Ticket-ID": ticket},
        )
        made.append(NewDelivery(id=delivery_id, role=role, message=message))
    return made


async def test_dispatchers_racing_for_one_backlog_never_claim_a_delivery_twice(
    fresh_postgres_url: str,
) -> None:
    """Six store instances (as six replicas' dispatchers) drain 300 due deliveries at once."""
    t0 = datetime.now(UTC)
    stores = [await Store.open(fresh_postgres_url) for _ in range(6)]
    try:
        for n in range(150):
            await stores[n % 6].accept(
                use_case="UC2",
                ticket_id=f"TKT-{n}",
                customer_id="CUST-001",
                payload_hash="p",
                created_at=t0,
                local_day="20251107",
                new_deliveries=new_deliveries(f"TKT-{n}", t0),
                recipient_cap=10,
                lease_owner="accepting-replica",
                lease_until=t0,  # it died at once: everything is due for the others
                give_up_at=t0 + timedelta(hours=1),
            )
        claims: dict[str, list[str]] = defaultdict(list)

        async def drain(index: int, store: Store) -> None:
            owner = f"replica-{index}"
            while True:
                now = datetime.now(UTC)
                batch = await store.claim_due(
                    owner=owner, now=now, lease_until=now + timedelta(minutes=5), limit=7
                )
                if not batch:
                    return
                for record in batch:
                    claims[record.id].append(owner)

        await asyncio.gather(*(drain(i, s) for i, s in enumerate(stores)))
    finally:
        for store in stores:
            await store.close()
    assert len(claims) == 300
    assert max(len(owners) for owners in claims.values()) == 1
    assert len({owners[0] for owners in claims.values()}) >= 2  # they really competed


async def test_a_backlog_is_shared_by_several_replicas_and_each_email_sent_once(
    cluster: Callable[..., Cluster], sink: SMTPSink
) -> None:
    replicas = cluster(3)
    sink.down()
    async with sessions(replicas.urls) as clients:
        results = await asyncio.gather(
            *(clients[n % 3].call_tool("sendemail", call_for(n)) for n in range(40))
        )
    assert {data(r)["status"] for r in results} == {"queued"}
    assert "Email sent to" not in replicas.logs()
    sink.up()  # eighty deliveries fall due on three dispatchers at once
    rows = await settled(replicas.database_url, 80)
    stop_gracefully(replicas)
    counts = Counter(sink.message_ids())
    assert all(d.status == "sent" for d in rows)
    assert set(counts) == {d.message_id for d in rows} and max(counts.values()) == 1
    # The replicas shared the backlog (row locks decided who sends what), not one of them alone.
    assert sum(1 for r in replicas.replicas if "Email sent to" in r.logs()) >= 2


# -- stateless HTTP: any replica serves any request ----------------------------------------------


@dataclass
class RoundRobinProxy:
    """A tiny HTTP load balancer without sticky sessions: each request goes to the next replica."""

    backends: list[str]
    port: int = field(default_factory=free_port)
    #: (replica index, HTTP method, JSON-RPC method or "", HTTP status) per forwarded request
    served: list[tuple[int, str, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._turn = itertools.cycle(range(len(self.backends)))
        self._client = httpx2.AsyncClient(timeout=30)
        self._server = uvicorn.Server(
            uvicorn.Config(self, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def __aenter__(self) -> RoundRobinProxy:
        self._task = asyncio.create_task(self._server.serve())
        for _ in range(1000):
            if self._server.started:
                return self
            await asyncio.sleep(0.01)
        raise AssertionError("the round-robin proxy did not start")

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        await self._client.aclose()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        turn = next(self._turn)
        hop = {b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"}
        query = f"?{scope['query_string'].decode()}" if scope["query_string"] else ""
        upstream = self._client.build_request(
            scope["method"],
            f"{self.backends[turn]}{scope['path']}{query}",
            headers=[(k, v) for k, v in scope["headers"] if k.lower() not in hop],
            content=body,
        )
        response = await self._client.send(upstream, stream=True)
        self.served.append((turn, scope["method"], _rpc_method(body), response.status_code))
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in hop]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        try:
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await response.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _rpc_method(body: bytes) -> str:
    try:
        message = json.loads(body)
    except ValueError:
        return ""
    return str(message.get("method", "")) if isinstance(message, dict) else ""


async def one_session_through(
    proxy: RoundRobinProxy, mode: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """sendemail, then get_email_status three times, all on one client session through the proxy."""
    async with asyncio.timeout(30), Client(proxy.url, mode=mode) as client:
        sent = data(await client.call_tool("sendemail", call_for(1 if mode == "legacy" else 2)))
        statuses = [
            data(await client.call_tool("get_email_status", {"email_id": sent["email_id"]})) for _ in range(3)
        ]
    return sent, statuses


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_one_client_session_can_be_spread_over_stateless_replicas(
    cluster: Callable[..., Cluster], mode: str
) -> None:
    """`legacy`: the 2025 initialize handshake, where stateless_http matters; `auto`: 2026-07-28."""
    replicas = cluster(3)
    async with RoundRobinProxy([r.url for r in replicas.replicas]) as proxy:
        sent, statuses = await one_session_through(proxy, mode)
    tool_calls = [turn for turn, _, method, _ in proxy.served if method == "tools/call"]
    assert len(tool_calls) == 4 and len(set(tool_calls)) == 3  # the calls went to every replica...
    assert tool_calls[0] != tool_calls[1]  # ...and the status was asked of another than the sender
    assert {status for *_, status in proxy.served} <= {200, 202}
    for status in statuses:
        assert status["email_id"] == sent["email_id"]
        assert [d["message_id"] for d in status["deliveries"]] == [
            d["message_id"] for d in sent["deliveries"]
        ]
        assert status["status"] == "sent"


async def test_without_stateless_http_a_handshake_session_breaks_when_spread_over_replicas(
    cluster: Callable[..., Cluster],
) -> None:
    """Why replicas need server.stateless_http: the default keeps sessions in one process."""
    replicas = cluster(2, {"server": {"stateless_http": False, "json_response": False}})
    async with RoundRobinProxy([r.url for r in replicas.replicas]) as proxy:
        # The SDK raises it wrapped in task-group exception groups.
        with pytest.raises(Exception) as failure:
            await one_session_through(proxy, "legacy")
        # The second replica has never heard of the session the first one opened.
        assert "Session not found" in repr(failure.value)
        assert any(status == 404 for *_, status in proxy.served), proxy.served
        # A 2026-07-28 client sends self-contained requests: it works even here.
        proxy.served.clear()
        sent, statuses = await one_session_through(proxy, "auto")
    assert {turn for turn, _, method, _ in proxy.served if method == "tools/call"} == {0, 1}
    assert all(status["email_id"] == sent["email_id"] for status in statuses)


# -- shared rate limits --------------------------------------------------------------------------


class RateSlotWatch:
    """Every send slot the replicas take (`rate_events` rows), read while they take them.

    The store forgets a slot once it is older than the longest window, so the rows are read
    every 0.1 s while the test runs (far more often than the 6 s they live) and kept here.
    """

    def __init__(self, database_url: str, transport: str) -> None:
        self.database_url = database_url
        self.transport = transport
        self.seen: dict[int, datetime] = {}
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RateSlotWatch:
        conn = await asyncpg.connect(self.database_url)
        await self._read(conn)
        self._task = asyncio.create_task(self._watch(conn))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._done.set()
        if self._task is not None:
            await self._task

    async def _watch(self, conn: asyncpg.Connection) -> None:
        try:
            while not self._done.is_set():
                await asyncio.sleep(0.1)
                await self._read(conn)
        finally:
            await conn.close()

    async def _read(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch("SELECT id, at FROM rate_events WHERE transport = $1", self.transport)
        self.seen.update((row["id"], row["at"]) for row in rows)

    @property
    def slots(self) -> list[datetime]:
        return sorted(self.seen.values())


async def test_rate_limit_budget_is_shared_by_replicas_and_the_excess_queues(
    cluster: Callable[..., Cluster], sink: SMTPSink
) -> None:
    replicas = cluster(2, {"transports": {"smtp": {"rate_limits": ["4/6 seconds"]}}})
    calls = [call_for(n) for n in range(4)]  # eight emails: twice the budget of one window
    async with RateSlotWatch(replicas.database_url, "smtp") as watch:
        results = [
            data(r)
            for r in await asyncio.gather(
                *(call(replicas.urls[n % 2], "sendemail", args) for n, args in enumerate(calls))
            )
        ]
        throttled = [d for r in results for d in r["deliveries"] if d["status"] == "queued"]
        assert throttled and all("rate limit" in d["error"] for d in throttled)
        assert all(d["status"] != "failed" for r in results for d in r["deliveries"])
        rows = await settled(replicas.database_url, 8, within=40)
    assert all(d.status == "sent" for d in rows)  # queued, then delivered: none failed
    stop_gracefully(replicas)
    assert sorted(sink.message_ids()) == sorted(d.message_id for d in rows)
    # Every attempt took a slot first, and the watch saw each slot the replicas took...
    slots = watch.slots
    assert len(slots) == sum(d.attempts for d in rows) >= 8
    # ...and at most 4 of them, across both replicas, fall in any 6 s window: the slot times the
    # gateway itself recorded, so a message delayed on its way to the sink cannot blur them.
    spans = [later - first for first, later in zip(slots, slots[4:], strict=False)]
    assert spans and min(spans) >= timedelta(seconds=6), spans


# -- kill -9 mid-burst ---------------------------------------------------------------------------


async def leases_of(database_url: str, pid: int) -> set[str]:
    """Deliveries leased to the process with this pid (owner ids are `<host>-<pid>-<random>`)."""
    store = await Store.open(database_url)
    try:
        async with engine_of(store).connect() as conn:
            rows = await conn.execute(
                select(deliveries.c.id, deliveries.c.lease_owner).where(deliveries.c.lease_owner.is_not(None))
            )
            return {row.id for row in rows if row.lease_owner.split("-")[-2] == str(pid)}
    finally:
        await store.close()


async def until_safe_to_kill(
    database_url: str, sink: SMTPSink, victim_pid: int, pinned_tickets: set[str]
) -> None:
    """Wait until the sink (refusing everything by now) has nothing the store does not know as sent,
    and the pinned escalations are recorded and mid-send on the victim (leased to it, not sent).
    """
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + 60
        while True:
            rows = await conn.fetch(
                "SELECT e.ticket_id, d.message_id, d.status, d.lease_owner "
                "FROM deliveries d JOIN escalations e ON e.email_id = d.email_id"
            )
            sent = {row["message_id"] for row in rows if row["status"] == "sent"}
            pinned = [row for row in rows if row["ticket_id"] in pinned_tickets]
            on_victim = [
                row
                for row in pinned
                if row["status"] == "queued"
                and row["lease_owner"] is not None
                and row["lease_owner"].split("-")[-2] == str(victim_pid)
            ]
            if set(sink.message_ids()) <= sent and len(on_victim) == 2 * len(pinned_tickets):
                return
            if time.monotonic() > deadline:
                unrecorded = len(set(sink.message_ids()) - sent)
                raise AssertionError(
                    f"not safe to kill within 60 s: {unrecorded} accepted messages not recorded sent, "
                    f"{len(on_victim)} pinned deliveries mid-send on the victim"
                )
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def test_three_replicas_one_killed_mid_burst_deliver_every_escalation_exactly_once(
    cluster: Callable[..., Cluster], sink: SMTPSink
) -> None:
    # Inside a call, retry 451s until the deadline: a call on the victim holds its lease for 5 s.
    replicas = cluster(3, {"email": {"timeout_seconds": 5, "retry_count": 10}})
    victim = replicas.replicas[0]
    assert victim.proc is not None
    victim_pid = victim.proc.pid
    tickets = 120
    # A job: one escalation sent to a replica; every second one also to another replica, either
    # at the same moment or after the first answer came back.
    jobs: deque[tuple[dict[str, str], list[int], bool]] = deque()
    for n in range(tickets):
        targets = [n % 3]
        if n % 2 == 0:  # a duplicate to each of the two other replicas in turn
            targets.append((n + 1 + n // 2 % 2) % 3)
        jobs.append((call_for(n), targets, n % 4 == 0))
    answers: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    lost_calls: list[tuple[str, int]] = []
    dead: set[int] = set()

    async def send(args: dict[str, str], preferred: int) -> None:
        """Like a load balancer: a call the replica could not answer is retried on the next one."""
        for step in range(3):
            turn = (preferred + step) % 3
            if turn in dead:
                continue
            try:
                result = await call(replicas.urls[turn], "sendemail", args)
            except Exception:
                lost_calls.append((args["ticket_id"], turn))
                continue
            answers[args["ticket_id"]].append((turn, data(result)))
            return
        raise AssertionError(f"no replica answered for {args['ticket_id']}")

    async def worker() -> None:
        while jobs:
            args, targets, together = jobs.popleft()
            if together:
                await asyncio.gather(*(send(args, t) for t in targets))
            else:
                for target in targets:
                    await send(args, target)

    burst = asyncio.gather(*(worker() for _ in range(12)))

    # The kill. The sink answers 451 from before it until after it, and the kill waits until every
    # message the sink took is recorded sent: at the moment of death no message is accepted by the
    # sink but not yet recorded by the replica sending it.
    await asyncio.to_thread(sink.wait_for, 60, 60)
    sink.fail_fraction(1.0, seed=9)
    # Two more escalations for the victim: they are certainly mid-send (retrying) when it dies.
    pinned_calls = [call_for(tickets + k) for k in range(2)]
    pinned = [asyncio.create_task(send(args, 0)) for args in pinned_calls]
    await until_safe_to_kill(
        replicas.database_url, sink, victim_pid, {args["ticket_id"] for args in pinned_calls}
    )
    at_death = set(sink.message_ids())
    victim.kill()
    dead.add(0)  # the load balancer's health check takes it out
    assert not burst.done(), "the burst ended before the kill; make it longer"
    orphaned = await leases_of(replicas.database_url, victim_pid)
    # What the victim wrote just before it died may still sit unread at the sink: drop every
    # connection (a quick restart of the sink) before it accepts again, so none of that can land.
    sink.down()
    sink.up()
    sink.fail_fraction(0.0)

    await asyncio.gather(burst, *pinned)
    tickets += len(pinned)
    rows, _ = await recorded(replicas.database_url)
    delivered = await settled(replicas.database_url, 2 * len(rows))
    for survivor in replicas.replicas[1:]:  # graceful stop: whatever was in flight has landed
        assert survivor.stop() in (0, -signal.SIGTERM), survivor.logs()
    counts = Counter(sink.message_ids())

    # Every call got an answer, and every answer for a ticket names the same escalation.
    assert len(answers) == tickets
    assert len(rows) == tickets and {r["ticket_id"] for r in rows} == set(answers)
    email_id_of = {r["ticket_id"]: r["email_id"] for r in rows}
    for ticket, got in answers.items():
        assert {a["email_id"] for _, a in got} == {email_id_of[ticket]}, (ticket, got)
        assert sum(not a["replay"] for _, a in got) <= 1, (ticket, got)
    replayed_elsewhere = [t for t, got in answers.items() if len({turn for turn, _ in got}) > 1]
    assert len(replayed_elsewhere) >= tickets // 6  # duplicates answered by other replicas
    assert_sequential_per_day([r["email_id"] for r in rows])

    # Every recorded delivery reached its recipient exactly once: no duplicate, none missing.
    assert len(delivered) == 2 * tickets
    assert all(d.status == "sent" for d in delivered), Counter(d.status for d in delivered)
    assert set(counts) == {d.message_id for d in delivered}
    assert max(counts.values()) == 1, [m for m, c in counts.items() if c > 1]
    recipient_of = {d.message_id: d.address for d in delivered}
    assert all(m.recipients == (recipient_of[m.message_id],) for m in sink.messages)

    # The victim died mid-call holding leases; the survivors took that work over and sent it once.
    assert {ticket for ticket, turn in lost_calls if turn == 0} >= {p["ticket_id"] for p in pinned_calls}
    assert orphaned, "the victim held no leases when it was killed"
    orphaned_ids = {d.message_id for d in delivered if d.id in orphaned}
    assert not orphaned_ids & at_death
    assert all(counts[m] == 1 for m in orphaned_ids)
    survivors_logs = "\n".join(r.logs() for r in replicas.replicas[1:])
    assert_clean(survivors_logs)
