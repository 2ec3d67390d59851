"""The store: escalations, their deliveries (the outbox), the email_id counter, rate limits.

Everything that decides correctness lives in the database, so several replicas can
share one PostgreSQL: a unique constraint makes each ticket escalate once, an
upsert numbers email_ids, leases (claimed with FOR UPDATE SKIP LOCKED where the
database has it) make one process send each pending delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import (
    Integer,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Update

from gateway.config import POSTGRES_SCHEMES, SQLITE_SCHEMES
from gateway.errors import ConfigError, RecipientLimitError, TicketConflictError
from gateway.logs import mask_address, redact
from gateway.store import schema
from gateway.store.schema import counters, deliveries, escalations, rate_events, rate_limiters
from gateway.transport import DeliveryStatus, OutgoingMessage

_T = TypeVar("_T")
_DELIVERY_COLUMNS = [c for c in deliveries.c]
#: PostgreSQL: serialises the escalations of one recipient address (see `Store._lock_recipient`)
_RECIPIENT_LOCK = text("SELECT pg_advisory_xact_lock(hashtextextended(:address, 0))")
#: PostgreSQL advisory lock key held while the schema is created or upgraded (one replica at a time)
MIGRATION_LOCK = 724106
#: deliveries one retention transaction scrubs at most (a short write lock on SQLite)
SCRUB_BATCH = 500


@dataclass
class DeliveryRecord:
    """One email of an escalation, as the outbox holds it."""

    id: str
    email_id: str
    use_case: str
    role: str
    address: str
    message_id: str
    status: DeliveryStatus
    transport: str | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    provider_id: str | None
    created_at: datetime
    give_up_at: datetime
    sent_at: datetime | None
    finished_at: datetime | None
    sender: str
    subject: str
    text_body: str
    html_body: str
    headers: dict[str, str]
    #: set once the retention job emptied the bodies and masked the customer's address
    scrubbed_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> DeliveryRecord:
        values = {c.name: row._mapping[c.name] for c in _DELIVERY_COLUMNS if c.name in row._mapping}
        values["headers"] = json.loads(values["headers"])
        for internal in ("lease_owner", "lease_until"):
            values.pop(internal, None)
        return cls(**values)

    def message(self) -> OutgoingMessage:
        return OutgoingMessage(
            delivery_id=self.id,
            message_id=self.message_id,
            sender=self.sender,
            recipients=(self.address,),
            subject=self.subject,
            text=self.text_body,
            html=self.html_body,
            date=self.created_at,
            headers=self.headers,
        )


@dataclass
class EscalationRecord:
    email_id: str
    use_case: str
    ticket_id: str
    customer_id: str
    payload_hash: str
    created_at: datetime
    deliveries: list[DeliveryRecord] = field(default_factory=list)

    def delivery(self, role: str) -> DeliveryRecord:
        return next(d for d in self.deliveries if d.role == role)


@dataclass(frozen=True)
class NewDelivery:
    id: str
    role: str
    message: OutgoingMessage


@dataclass(frozen=True)
class Accepted:
    record: EscalationRecord
    replay: bool


@dataclass(frozen=True)
class Outcome:
    """What one send (or status check) did to a delivery; applied under the lease."""

    delivery_id: str
    status: DeliveryStatus
    transport: str | None
    attempts_added: int
    next_attempt_at: datetime | None = None
    error: str | None = None
    provider_id: str | None = None
    sent_at: datetime | None = None
    finished_at: datetime | None = None


def driver_url(database_url: str) -> str:
    """Map the contract's URLs onto the drivers: asyncpg for PostgreSQL, the standard library's
    sqlite3 (on the store's own thread, see `_SqliteThread`) for SQLite."""
    url = make_url(database_url)
    if url.drivername in SQLITE_SCHEMES:
        return str(url.set(drivername="sqlite"))
    if url.drivername in POSTGRES_SCHEMES:
        return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ConfigError(f"DATABASE_URL: unsupported database {url.drivername!r}; use sqlite or postgresql")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook emit BEGIN itself (IMMEDIATE for writers).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in ("busy_timeout=30000", "synchronous=NORMAL", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _enable_wal(path: Path) -> None:
    """Switch the file to WAL once (it persists), under a file lock.

    Two processes switching a new file at the same time can deadlock inside SQLite,
    so the switch happens here, before any pooled connection exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()


async def _dispose(engine: Engine) -> None:
    engine.dispose()  # on the SQLite thread: its connections were made there


def _sqlite_begin(conn: Connection) -> None:
    readonly = conn.get_execution_options().get("gateway_readonly", False)
    conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


class _InlineConnection:
    """The part of `AsyncConnection` the store uses, over a synchronous SQLite connection.

    Its coroutines never suspend, so a transaction written against `AsyncConnection` runs
    start to finish in one step on the SQLite thread (see `_SqliteThread`).
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return self._conn.execute(statement, parameters)

    async def scalar(self, statement: Any, parameters: Any = None) -> Any:
        return self._conn.scalar(statement, parameters)

    async def run_sync(self, fn: Callable[..., _T], *args: Any) -> _T:
        return fn(self._conn, *args)

    @asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[None]:
        with self._conn.begin_nested():
            yield


class _SqliteThread:
    """One thread on which every SQLite transaction runs whole, start to finish.

    A SQLite transaction is a few hundred microseconds of local work. Stepped statement by
    statement through an async driver (aiosqlite) it cost a thread round trip per statement
    (about twenty per escalation), each waiting for a busy event loop while SQLite's single
    write lock was held: that capped throughput (bench/, docs/benchmarks.md). Here a
    transaction costs one hand-over each way, runs without yielding (so transactions never
    interleave), and any wait for SQLite's lock (another process writing, a checkpoint)
    blocks this thread, never the server's loop.

    The store's coroutines never suspend on SQLite (`_InlineConnection`), so this thread
    drives each with a single `send` instead of running an event loop of its own: an
    event loop here cost a self-pipe write and a wake-up per transaction (bench/).
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="gateway-sqlite", daemon=True)
        self._thread.start()

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._stopped:
            coro.close()
            raise RuntimeError("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._jobs.put(_Job(coro, future, loop))
        return await future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.future.cancelled():  # its caller gave up before it started: never run it
                job.coro.close()
                continue
            try:
                job.coro.send(None)
            except StopIteration as finished:
                job.settle(finished.value, None)
            except BaseException as error:  # the caller's to handle, on its own loop
                job.settle(None, error)
            else:
                job.coro.close()
                job.settle(None, RuntimeError("a store transaction suspended on the SQLite thread"))
        # Stopped: whatever was queued behind the stop is refused, so no caller waits forever.
        while not self._jobs.empty():
            if (late := self._jobs.get()) is not None:
                late.coro.close()
                late.settle(None, RuntimeError("the store is closed"))

    def stop(self) -> None:
        self._stopped = True
        self._jobs.put(None)
        self._thread.join()


@dataclass(frozen=True)
class _Job:
    """One transaction for the SQLite thread, and where its caller waits for the result."""

    coro: Coroutine[Any, Any, Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop

    def settle(self, value: Any, error: BaseException | None) -> None:
        # RuntimeError: the caller's loop is closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle, self.future, value, error)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


_Method = TypeVar("_Method", bound=Callable[..., Coroutine[Any, Any, Any]])


def _on_sqlite_thread(method: _Method) -> _Method:
    """Run a store method on the SQLite thread when there is one (on PostgreSQL: as it is)."""

    @functools.wraps(method)
    async def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        if self._sqlite_thread is None:
            return await method(self, *args, **kwargs)
        return await self._sqlite_thread.run(method(self, *args, **kwargs))

    return cast(_Method, wrapper)


class Store:
    """Async access to the gateway's tables; one instance per process."""

    def __init__(self, engine: AsyncEngine | None, sqlite: Engine | None = None) -> None:
        #: PostgreSQL: the asyncpg engine. SQLite: None (see `_SqliteThread`).
        self.engine = engine
        self._reader = engine.execution_options(gateway_readonly=True) if engine else None
        #: SQLite only: the synchronous engine, used on `_sqlite_thread` alone
        self._sqlite = sqlite
        self._sqlite_reader = sqlite.execution_options(gateway_readonly=True) if sqlite else None
        self._sqlite_thread = _SqliteThread() if sqlite is not None else None
        self.dialect = (engine.dialect if engine is not None else sqlite.dialect).name  # type: ignore[union-attr]

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (BEGIN IMMEDIATE on SQLite)."""
        if self._sqlite is not None:
            with self._sqlite.begin() as conn:
                yield cast(AsyncConnection, _InlineConnection(conn))
            return
        assert self.engine is not None
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction."""
        if self._sqlite_reader is not None:
            with self._sqlite_reader.begin() as conn:
                yield cast(AsyncConnection, _InlineConnection(conn))
            return
        assert self._reader is not None
        async with self._reader.begin() as conn:
            yield conn

    # -- life cycle ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, database_url: str) -> Store:
        url = driver_url(database_url)
        parsed = make_url(url)
        if parsed.drivername.startswith("sqlite"):
            if parsed.database and parsed.database != ":memory:":
                await asyncio.to_thread(_enable_wal, Path(parsed.database))
            # hide_parameters: an error's message must never carry an email's text into a log.
            sqlite = create_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
            event.listen(sqlite, "connect", _sqlite_pragmas)
            event.listen(sqlite, "begin", _sqlite_begin)
            store = cls(None, sqlite)
        else:
            store = cls(
                create_async_engine(
                    url, pool_size=10, max_overflow=10, pool_pre_ping=True, hide_parameters=True
                )
            )
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._sqlite is not None and self._sqlite_thread is not None:
            await self._sqlite_thread.run(_dispose(self._sqlite))
            self._sqlite_thread.stop()
        if self.engine is not None:
            await self.engine.dispose()

    @_on_sqlite_thread
    async def migrate(self) -> None:
        """Create or upgrade the schema; safe when several replicas start at once."""
        from gateway.store.migrations import upgrade

        async with self._writing() as conn:
            if self.dialect == "postgresql":
                await conn.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            await conn.run_sync(upgrade)

    @_on_sqlite_thread
    async def ping(self) -> None:
        async with self._reading() as conn:
            await conn.execute(select(1))

    # -- accepting an escalation -----------------------------------------------------------------

    @_on_sqlite_thread
    async def accept(
        self,
        *,
        use_case: str,
        ticket_id: str,
        customer_id: str,
        payload_hash: str,
        created_at: datetime,
        local_day: str,
        new_deliveries: Sequence[NewDelivery],
        recipient_cap: int | None,
        lease_owner: str,
        lease_until: datetime,
        give_up_at: datetime,
    ) -> Accepted:
        """Record the escalation and its deliveries in one transaction, or find the earlier one.

        The deliveries are recorded leased to `lease_owner`, who sends them at once; if that
        process dies, the lease expires and the dispatcher of any replica takes over.
        """
        for _ in range(3):
            try:
                async with self._writing() as conn:
                    earlier = await self._find(conn, use_case, ticket_id)
                    if earlier is not None:
                        return self._replay(earlier, payload_hash)
                    customer = next(d for d in new_deliveries if d.role == "customer")
                    # The cap counts an address in any case of its letters (ASCII, validated).
                    address = customer.message.recipients[0].lower()
                    if recipient_cap is not None:
                        if self.dialect != "sqlite":  # SQLite's BEGIN IMMEDIATE admits one writer anyway
                            await self._lock_recipient(conn, address)
                            # A concurrent identical call may have committed while we waited.
                            earlier = await self._find(conn, use_case, ticket_id)
                            if earlier is not None:
                                return self._replay(earlier, payload_hash)
                        await self._check_recipient_cap(conn, address, created_at, recipient_cap)
                    number = await self._next_number(conn, f"{use_case}:{local_day}")
                    email_id = f"EMAIL-{use_case}-{local_day}-{number:03d}"
                    await conn.execute(
                        _INSERT_ESCALATION,
                        {
                            "email_id": email_id,
                            "use_case": use_case,
                            "ticket_id": ticket_id,
                            "customer_id": customer_id,
                            "payload_hash": payload_hash,
                            "created_at": created_at,
                        },
                    )
                    rows = [
                        self._delivery_row(
                            email_id, use_case, d, created_at, give_up_at, lease_owner, lease_until
                        )
                        for d in new_deliveries
                    ]
                    await conn.execute(_INSERT_DELIVERIES, rows)
                record = EscalationRecord(
                    email_id=email_id,
                    use_case=use_case,
                    ticket_id=ticket_id,
                    customer_id=customer_id,
                    payload_hash=payload_hash,
                    created_at=created_at,
                    deliveries=[DeliveryRecord.from_row(_RowLike(row)) for row in rows],
                )
                return Accepted(record=record, replay=False)
            except IntegrityError:
                # A concurrent call recorded the same ticket first: go round and replay it.
                continue
        raise RuntimeError(f"could not record ticket {ticket_id} after repeated conflicts")

    @staticmethod
    def _replay(earlier: EscalationRecord, payload_hash: str) -> Accepted:
        if earlier.payload_hash != payload_hash:
            raise TicketConflictError(
                f"ticket {earlier.ticket_id} was already escalated for {earlier.use_case} "
                f"({earlier.email_id}) with different content; use a new ticket_id for a new "
                "escalation, or repeat the original call unchanged to get its result",
                field="ticket_id",
            )
        return Accepted(record=earlier, replay=True)

    async def _lock_recipient(self, conn: AsyncConnection, address: str) -> None:
        """Lock this address until commit (PostgreSQL), so its escalations are capped one at a time.

        Without it, two replicas escalating for one customer under READ COMMITTED would both
        count the same rows and both pass at cap - 1. A transaction-scoped advisory lock on the
        address's hash leaves nothing behind in the database.
        """
        await conn.execute(_RECIPIENT_LOCK, {"address": address})

    async def _check_recipient_cap(
        self, conn: AsyncConnection, address: str, now: datetime, cap: int
    ) -> None:
        since = now - timedelta(hours=1)
        count = await conn.scalar(_RECENT_TO_CUSTOMER, {"address": address, "since": since})
        if (count or 0) >= cap:
            raise RecipientLimitError(
                f"customer_email has already received {count} escalation emails in the last hour "
                f"(limit {cap}); this looks like a loop. Wait before escalating again for this customer, "
                "or add to an existing ticket",
                field="customer_email",
            )

    async def _next_number(self, conn: AsyncConnection, name: str) -> int:
        value = await conn.scalar(_counter_increment(self.dialect), {"name": name})
        assert value is not None
        return int(value)

    @staticmethod
    def _delivery_row(
        email_id: str,
        use_case: str,
        new: NewDelivery,
        created_at: datetime,
        give_up_at: datetime,
        owner: str,
        lease_until: datetime,
    ) -> dict[str, Any]:
        msg = new.message
        return {
            "id": new.id,
            "email_id": email_id,
            "use_case": use_case,
            "role": new.role,
            "address": msg.recipients[0],
            "message_id": msg.message_id,
            "status": "queued",
            "transport": None,
            "attempts": 0,
            "next_attempt_at": created_at,
            "lease_owner": owner,
            "lease_until": lease_until,
            "last_error": None,
            "provider_id": None,
            "created_at": created_at,
            "give_up_at": give_up_at,
            "sent_at": None,
            "finished_at": None,
            "sender": msg.sender,
            "subject": msg.subject,
            "text_body": msg.text,
            "html_body": msg.html,
            "headers": json.dumps(dict(msg.headers)),
        }

    # -- reading ---------------------------------------------------------------------------------

    async def _find(self, conn: AsyncConnection, use_case: str, ticket_id: str) -> EscalationRecord | None:
        row = (await conn.execute(_FIND_TICKET, {"use_case": use_case, "ticket_id": ticket_id})).first()
        return None if row is None else await self._with_deliveries(conn, row)

    async def _with_deliveries(self, conn: AsyncConnection, row: Any) -> EscalationRecord:
        record = EscalationRecord(**dict(row._mapping))
        result = await conn.execute(
            select(deliveries)
            .where(deliveries.c.email_id == record.email_id)
            .order_by(deliveries.c.role.desc())
        )
        record.deliveries = [DeliveryRecord.from_row(r) for r in result]
        return record

    @_on_sqlite_thread
    async def load(self, email_id: str) -> EscalationRecord | None:
        async with self._reading() as conn:
            row = (await conn.execute(select(escalations).where(escalations.c.email_id == email_id))).first()
            return None if row is None else await self._with_deliveries(conn, row)

    @_on_sqlite_thread
    async def count_by_status(self) -> dict[str, int]:
        async with self._reading() as conn:
            rows = await conn.execute(select(deliveries.c.status, func.count()).group_by(deliveries.c.status))
            return {status: count for status, count in rows}

    @_on_sqlite_thread
    async def list_deliveries(self, status: str, limit: int = 100) -> list[DeliveryRecord]:
        async with self._reading() as conn:
            rows = await conn.execute(
                select(deliveries)
                .where(deliveries.c.status == status)
                .order_by(deliveries.c.created_at)
                .limit(limit)
            )
            return [DeliveryRecord.from_row(r) for r in rows]

    # -- the outbox ------------------------------------------------------------------------------

    @_on_sqlite_thread
    async def claim_due(
        self, *, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[DeliveryRecord]:
        """Lease up to `limit` deliveries that are due: queued ones to send, sent ones to confirm."""
        due = and_(
            deliveries.c.status.in_(("queued", "sent")),
            deliveries.c.next_attempt_at.is_not(None),
            deliveries.c.next_attempt_at <= now,
            or_(deliveries.c.lease_until.is_(None), deliveries.c.lease_until < now),
        )
        async with self._writing() as conn:
            ids = list(
                (
                    await conn.execute(
                        select(deliveries.c.id)
                        .where(due)
                        .order_by(deliveries.c.next_attempt_at)
                        .limit(limit)
                        .with_for_update(skip_locked=True)
                    )
                ).scalars()
            )
            if not ids:
                return []
            await conn.execute(
                update(deliveries)
                .where(deliveries.c.id.in_(ids), due)
                .values(lease_owner=owner, lease_until=lease_until)
            )
            rows = await conn.execute(
                select(deliveries).where(deliveries.c.id.in_(ids), deliveries.c.lease_owner == owner)
            )
            return [DeliveryRecord.from_row(r) for r in rows]

    @_on_sqlite_thread
    async def record(self, outcomes: Sequence[Outcome], owner: str) -> list[str]:
        """Apply outcomes under `owner`'s lease and release it; returns ids whose lease was lost."""
        lost: list[str] = []
        async with self._writing() as conn:
            for o in outcomes:
                values: dict[str, Any] = {
                    "status": o.status,
                    "next_attempt_at": o.next_attempt_at,
                    "lease_owner": None,
                    "lease_until": None,
                    "last_error": o.error,
                }
                if o.transport is not None:
                    values["transport"] = o.transport
                for name in ("provider_id", "sent_at", "finished_at"):
                    if getattr(o, name) is not None:
                        values[name] = getattr(o, name)
                result = await conn.execute(
                    _outcome_update(tuple(values)),
                    {"b_id": o.delivery_id, "b_owner": owner, "b_added": o.attempts_added}
                    | {f"b_{name}": value for name, value in values.items()},
                )
                if result.rowcount == 0:
                    lost.append(o.delivery_id)
        return lost

    @_on_sqlite_thread
    async def release(self, ids: Iterable[str], owner: str) -> None:
        """Give leased deliveries back untouched (shutdown): due again at once, for anyone."""
        ids = list(ids)
        if not ids:
            return
        async with self._writing() as conn:
            await conn.execute(
                update(deliveries)
                .where(deliveries.c.id.in_(ids), deliveries.c.lease_owner == owner)
                .values(lease_owner=None, lease_until=None)
            )

    @_on_sqlite_thread
    async def requeue(self, ids: Sequence[str] | None, now: datetime, horizon: timedelta) -> int:
        """Put failed deliveries back in the queue (all failed ones when `ids` is None).

        A scrubbed delivery (retention) has no body left to send and stays as it is."""
        where = and_(deliveries.c.status == "failed", deliveries.c.scrubbed_at.is_(None))
        if ids is not None:
            where = and_(where, deliveries.c.id.in_(list(ids)))
        async with self._writing() as conn:
            result = await conn.execute(
                update(deliveries)
                .where(where)
                .values(
                    status="queued",
                    next_attempt_at=now,
                    give_up_at=now + horizon,
                    finished_at=None,
                    lease_owner=None,
                    lease_until=None,
                )
            )
            return int(result.rowcount or 0)

    # -- retention -------------------------------------------------------------------------------

    @_on_sqlite_thread
    async def scrub(self, older_than: datetime, now: datetime, limit: int = SCRUB_BATCH) -> int:
        """Empty the bodies and mask the customer's address of up to `limit` finished deliveries
        created before `older_than`; returns how many. The escalation itself (ticket, customer id,
        payload hash) stays, so a repeated call is still a replay and never a second email."""
        async with self._writing() as conn:
            rows = (await conn.execute(_TO_SCRUB, {"older_than": older_than, "limit": limit})).all()
            if rows:
                await conn.execute(
                    _SCRUB,
                    [
                        {
                            "b_id": row.id,
                            "b_address": mask_address(row.address) if row.role == "customer" else row.address,
                            "b_error": None if row.last_error is None else redact(row.last_error),
                            "b_now": now,
                        }
                        for row in rows
                    ],
                )
            return len(rows)

    # -- transport rate limits -------------------------------------------------------------------

    @_on_sqlite_thread
    async def take_rate_slot(
        self, transport: str, windows: Sequence[tuple[int, float]], now: datetime
    ) -> float:
        """Take one send slot for `transport` under every (count, seconds) window.

        Returns 0 when the slot is taken, else how many seconds until one frees up.
        The limiter row is locked so replicas sharing PostgreSQL see one budget.
        """
        longest = max(seconds for _, seconds in windows)
        async with self._writing() as conn:
            locked = await conn.execute(
                update(rate_limiters).where(rate_limiters.c.transport == transport).values(touched_at=now)
            )
            if locked.rowcount == 0:
                try:
                    async with conn.begin_nested():
                        await conn.execute(insert(rate_limiters).values(transport=transport, touched_at=now))
                except IntegrityError:
                    await conn.execute(
                        update(rate_limiters)
                        .where(rate_limiters.c.transport == transport)
                        .values(touched_at=now)
                    )
            await conn.execute(
                delete(rate_events).where(
                    rate_events.c.transport == transport, rate_events.c.at <= now - timedelta(seconds=longest)
                )
            )
            wait = 0.0
            for limit, seconds in windows:
                in_window = rate_events.c.at > now - timedelta(seconds=seconds)
                used = (
                    await conn.scalar(
                        select(func.count())
                        .select_from(rate_events)
                        .where(rate_events.c.transport == transport, in_window)
                    )
                    or 0
                )
                if used >= limit:
                    # The slot frees when the oldest event that keeps us at the limit leaves the window.
                    oldest = await conn.scalar(
                        select(rate_events.c.at)
                        .where(rate_events.c.transport == transport, in_window)
                        .order_by(rate_events.c.at)
                        .offset(used - limit)
                        .limit(1)
                    )
                    if oldest is not None:
                        wait = max(wait, (oldest + timedelta(seconds=seconds) - now).total_seconds())
            if wait > 0:
                return wait
            await conn.execute(insert(rate_events).values(transport=transport, at=now))
            return 0.0


# Statements the hot paths run, built once with bind parameters: building a statement and its
# cache key for every call cost several times what SQLite took to run it.
_FIND_TICKET = select(escalations).where(
    escalations.c.use_case == bindparam("use_case"), escalations.c.ticket_id == bindparam("ticket_id")
)
_INSERT_ESCALATION = insert(escalations)
_INSERT_DELIVERIES = insert(deliveries)
#: finished deliveries created before `older_than`, not yet scrubbed, oldest first
_TO_SCRUB = (
    select(deliveries.c.id, deliveries.c.role, deliveries.c.address, deliveries.c.last_error)
    .where(
        deliveries.c.scrubbed_at.is_(None),
        deliveries.c.created_at < bindparam("older_than", type_=deliveries.c.created_at.type),
        deliveries.c.lease_owner.is_(None),
        or_(
            deliveries.c.status.in_(("delivered", "failed")),
            and_(deliveries.c.status == "sent", deliveries.c.next_attempt_at.is_(None)),
        ),
    )
    # scrubbed_at (NULL here) first: the order of ix_deliveries_unscrubbed, so no sort
    .order_by(deliveries.c.scrubbed_at, deliveries.c.created_at)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)  # replicas scrubbing at once share the work
)
_SCRUB = (
    update(deliveries)
    .where(deliveries.c.id == bindparam("b_id"))
    .values(
        address=bindparam("b_address"),
        text_body="",
        html_body="",
        last_error=bindparam("b_error"),
        scrubbed_at=bindparam("b_now", type_=deliveries.c.scrubbed_at.type),
    )
)
#: customer emails to `address` (lower-cased) since `since`; uses `schema.recipient_index`
_RECENT_TO_CUSTOMER = (
    select(func.count())
    .select_from(deliveries)
    .where(
        func.lower(deliveries.c.address) == bindparam("address"),
        deliveries.c.role == "customer",
        deliveries.c.created_at >= bindparam("since"),
    )
)


@functools.cache
def _counter_increment(dialect: str) -> Any:
    """Add one to the counter `name` (created at 1), returning the new value."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert  # type: ignore[assignment]
    return (
        upsert(counters)
        .values(name=bindparam("name"), value=1)
        .on_conflict_do_update(index_elements=[counters.c.name], set_={"value": counters.c.value + 1})
        .returning(counters.c.value)
    )


@functools.cache
def _outcome_update(columns: tuple[str, ...]) -> Update:
    """The UPDATE that applies an outcome setting `columns`, built once per combination.

    Building and cache-keying a fresh statement for every outcome was most of `record`'s cost.
    """
    return (
        update(deliveries)
        .where(deliveries.c.id == bindparam("b_id"), deliveries.c.lease_owner == bindparam("b_owner"))
        .values(
            {
                "attempts": deliveries.c.attempts + bindparam("b_added", type_=Integer()),
                **{name: bindparam(f"b_{name}", type_=deliveries.c[name].type) for name in columns},
            }
        )
    )


class _RowLike:
    """Adapts an insert's value dict to `DeliveryRecord.from_row`."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._mapping = values


__all__ = [
    "SCRUB_BATCH",
    "Accepted",
    "DeliveryRecord",
    "EscalationRecord",
    "NewDelivery",
    "Outcome",
    "Store",
    "driver_url",
    "schema",
]
