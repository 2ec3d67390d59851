"""The store on real SQLite and real PostgreSQL: the same code, the same guarantees."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import make_url

from gateway.errors import RecipientLimitError, TicketConflictError
from gateway.store import Accepted, NewDelivery, Outcome, Store
from gateway.store.schema import SCHEMA_VERSION
from gateway.store.store import _RECENT_TO_CUSTOMER, _TO_SCRUB
from gateway.transport import DeliveryStatus, OutgoingMessage

pytestmark = pytest.mark.anyio

T0 = datetime(2025, 11, 7, 7, 30, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    yield opened
    await opened.close()


def deliveries_for(customer: str = "customer@example.com") -> list[NewDelivery]:
    made = []
    for role, to in (("customer", customer), ("bank_team", "support@bankx.com")):
        delivery_id = str(uuid.uuid4())
        made.append(
            NewDelivery(
                id=delivery_id,
                role=role,
                message=OutgoingMessage(
                    delivery_id=delivery_id,
                    message_id=f"<{delivery_id}@bankx.com>",
                    sender="noreply@bankx.com",
                    recipients=(to,),
                    subject=f"subject for {role}",
                    text="text",
                    html="<p>html</p>",
                    date=T0,
                    headers={"X-Ticket-ID": "T"},
                ),
            )
        )
    return made


async def accept(
    store: Store,
    ticket: str,
    *,
    payload: str = "p",
    use_case: str = "UC2",
    customer: str = "customer@example.com",
    cap: int = 100,
    owner: str = "owner-a",
    at: datetime = T0,
    day: str = "20251107",
) -> Accepted:
    return await store.accept(
        use_case=use_case,
        ticket_id=ticket,
        customer_id="CUST-001",
        payload_hash=payload,
        created_at=at,
        local_day=day,
        new_deliveries=deliveries_for(customer),
        recipient_cap=cap,
        lease_owner=owner,
        lease_until=at + timedelta(seconds=30),
        give_up_at=at + timedelta(hours=24),
    )


async def test_accept_records_escalation_and_both_deliveries_queued_and_leased(store: Store) -> None:
    accepted = await accept(store, "TKT-1")
    assert not accepted.replay
    assert accepted.record.email_id == "EMAIL-UC2-20251107-001"
    loaded = await store.load(accepted.record.email_id)
    assert loaded is not None
    assert sorted(d.role for d in loaded.deliveries) == ["bank_team", "customer"]
    assert {d.status for d in loaded.deliveries} == {"queued"}
    assert loaded.delivery("customer").subject == "subject for customer"
    # Leased to the accepting process: nobody else may claim them before the lease ends.
    assert (
        await store.claim_due(
            owner="other", now=T0 + timedelta(seconds=5), lease_until=T0 + timedelta(seconds=60), limit=10
        )
        == []
    )


async def test_email_ids_count_per_use_case_and_day(store: Store) -> None:
    ids = [(await accept(store, f"TKT-{i}")).record.email_id for i in range(3)]
    other = (await accept(store, "TKT-X", use_case="UC3")).record.email_id
    next_day = (await accept(store, "TKT-Y", day="20251108")).record.email_id
    assert ids == ["EMAIL-UC2-20251107-001", "EMAIL-UC2-20251107-002", "EMAIL-UC2-20251107-003"]
    assert other == "EMAIL-UC3-20251107-001"
    assert next_day == "EMAIL-UC2-20251108-001"


async def test_same_ticket_same_payload_is_a_replay_of_the_first(store: Store) -> None:
    first = await accept(store, "TKT-1")
    again = await accept(store, "TKT-1")
    assert again.replay
    assert again.record.email_id == first.record.email_id
    assert [d.id for d in again.record.deliveries] == [d.id for d in first.record.deliveries]


async def test_same_ticket_other_payload_is_a_conflict(store: Store) -> None:
    await accept(store, "TKT-1")
    with pytest.raises(TicketConflictError, match="already escalated"):
        await accept(store, "TKT-1", payload="different")


async def test_concurrent_identical_accepts_record_one_escalation(database_url: str) -> None:
    stores = [await Store.open(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(accept(s, "TKT-RACE") for s in stores for _ in range(3)))
    finally:
        for s in stores:
            await s.close()
    assert sum(not r.replay for r in results) == 1
    assert len({r.record.email_id for r in results}) == 1


async def test_recipient_cap_counts_customer_emails_in_the_last_hour(store: Store) -> None:
    for i in range(3):
        await accept(store, f"TKT-{i}", cap=3, at=T0 + timedelta(minutes=i))
    with pytest.raises(RecipientLimitError, match="limit 3"):
        await accept(store, "TKT-4", cap=3, at=T0 + timedelta(minutes=10))
    await accept(store, "TKT-5", cap=3, customer="someone.else@example.com", at=T0 + timedelta(minutes=10))
    await accept(store, "TKT-6", cap=3, at=T0 + timedelta(minutes=61))  # the first fell out of the hour


async def test_recipient_cap_counts_an_address_whatever_the_case_of_its_letters(store: Store) -> None:
    for i, spelling in enumerate(["jane.doe@example.com", "Jane.Doe@example.com", "JANE.DOE@example.com"]):
        await accept(store, f"TKT-{i}", cap=3, customer=spelling, at=T0 + timedelta(minutes=i))
    with pytest.raises(RecipientLimitError, match="limit 3"):
        await accept(store, "TKT-4", cap=3, customer="jAnE.dOe@example.com", at=T0 + timedelta(minutes=10))


@pytest.mark.parametrize(
    ("statement", "index"),
    [(_RECENT_TO_CUSTOMER, "ix_deliveries_recipient_folded"), (_TO_SCRUB, "ix_deliveries_unscrubbed")],
    ids=["recipient cap", "retention"],
)
async def test_the_store_s_lookups_use_their_indexes_on_sqlite(
    tmp_path: Path, statement: Any, index: str
) -> None:
    store = await Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    await store.close()
    when = "2025-11-07 07:30:00.000000"
    values = {"address": "jane@example.com", "since": when, "older_than": when, "limit": 500}
    # The SQL the store sends, IN lists expanded, with its literal parameters and ours.
    state = statement.compile(dialect=sqlite_dialect()).construct_expanded_state(values)
    parameters = [state.parameters[name] for name in state.positiontup or []]
    with closing(sqlite3.connect(tmp_path / "store.db")) as db:
        plan = db.execute(f"EXPLAIN QUERY PLAN {state.statement}", parameters).fetchall()
    details = [row[-1] for row in plan]
    assert any(index in detail for detail in details), details
    assert not any("TEMP B-TREE" in detail for detail in details), details  # no sort of the rows


async def test_the_retention_lookup_follows_its_index_without_a_sort_on_postgresql(
    fresh_postgres_url: str,
) -> None:
    store = await Store.open(fresh_postgres_url)
    await store.close()
    values = {"older_than": T0.replace(tzinfo=None), "limit": 500}
    state = _TO_SCRUB.compile(dialect=asyncpg_dialect()).construct_expanded_state(values)
    parameters = [state.parameters[name] for name in state.positiontup or []]
    conn = await asyncpg.connect(fresh_postgres_url)
    try:
        await conn.execute("SET enable_seqscan = off")  # an empty table: ask what the index allows
        plan = "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {state.statement}", *parameters))
    finally:
        await conn.close()
    assert "ix_deliveries_unscrubbed" in plan and "Sort" not in plan, plan


async def test_expired_lease_is_claimed_by_exactly_one_other_process(database_url: str) -> None:
    first = await Store.open(database_url)
    accepted = await accept(first, "TKT-1")
    later = T0 + timedelta(minutes=5)
    stores = [await Store.open(database_url) for _ in range(3)]
    try:
        claims = await asyncio.gather(
            *(
                s.claim_due(
                    owner=f"replica-{i}", now=later, lease_until=later + timedelta(seconds=30), limit=10
                )
                for i, s in enumerate(stores)
            )
        )
    finally:
        for s in stores:
            await s.close()
    claimed = [d.id for batch in claims for d in batch]
    assert sorted(claimed) == sorted(d.id for d in accepted.record.deliveries)
    # The original owner lost its lease: its late outcome is refused, not applied.
    lost = await first.record(
        [Outcome(delivery_id=claimed[0], status="sent", transport="file", attempts_added=1)], "owner-a"
    )
    assert lost == [claimed[0]]
    await first.close()


async def test_recorded_outcome_releases_the_lease_and_sets_the_status(store: Store) -> None:
    accepted = await accept(store, "TKT-1")
    customer = accepted.record.delivery("customer")
    team = accepted.record.delivery("bank_team")
    retry_at = T0 + timedelta(seconds=40)
    lost = await store.record(
        [
            Outcome(delivery_id=customer.id, status="sent", transport="smtp", attempts_added=2, sent_at=T0),
            Outcome(
                delivery_id=team.id,
                status="queued",
                transport="smtp",
                attempts_added=3,
                next_attempt_at=retry_at,
                error="451 try later",
            ),
        ],
        "owner-a",
    )
    assert lost == []
    loaded = await store.load(accepted.record.email_id)
    assert loaded is not None
    assert (loaded.delivery("customer").status, loaded.delivery("customer").attempts) == ("sent", 2)
    assert loaded.delivery("bank_team").last_error == "451 try later"
    due = await store.claim_due(
        owner="b", now=retry_at, lease_until=retry_at + timedelta(seconds=30), limit=5
    )
    assert [d.id for d in due] == [team.id]


async def test_failed_deliveries_can_be_listed_and_requeued(store: Store) -> None:
    accepted = await accept(store, "TKT-1")
    customer = accepted.record.delivery("customer")
    await store.record(
        [
            Outcome(
                delivery_id=customer.id,
                status="failed",
                transport="smtp",
                attempts_added=1,
                error="550 no such user",
            )
        ],
        "owner-a",
    )
    assert [d.id for d in await store.list_deliveries("failed")] == [customer.id]
    now = T0 + timedelta(hours=30)
    assert await store.requeue([customer.id], now, timedelta(hours=24)) == 1
    claimed = await store.claim_due(owner="b", now=now, lease_until=now + timedelta(seconds=30), limit=5)
    [queued] = [d for d in claimed if d.id == customer.id]
    assert queued.status == "queued" and queued.give_up_at == now + timedelta(hours=24)


async def test_rate_slots_queue_beyond_the_window_limit(store: Store) -> None:
    windows = [(3, 60.0)]
    waits = [await store.take_rate_slot("acs", windows, T0 + timedelta(seconds=i)) for i in range(4)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3] == pytest.approx(57.0)  # the first slot frees 60 s after T0
    assert await store.take_rate_slot("acs", windows, T0 + timedelta(seconds=60.5)) == 0.0
    assert await store.take_rate_slot("smtp", windows, T0) == 0.0  # budgets are per transport


async def finish(
    store: Store, accepted: Accepted, status: DeliveryStatus = "sent", error: str | None = None
) -> None:
    """Both deliveries of an escalation sent (or failed), as the dispatcher records them."""
    outcomes = [
        Outcome(delivery_id=d.id, status=status, transport="smtp", attempts_added=1, sent_at=T0, error=error)
        for d in accepted.record.deliveries
    ]
    assert await store.record(outcomes, "owner-a") == []


async def test_scrub_empties_old_finished_deliveries_and_masks_only_the_customer_address(
    store: Store,
) -> None:
    old = await accept(store, "TKT-OLD", customer="Jane.Doe@example.com")
    await finish(store, old, error="552 <Jane.Doe@example.com> mailbox full, then accepted")
    pending = await accept(store, "TKT-PENDING")  # still queued and leased: never scrubbed
    recent = await accept(store, "TKT-NEW", at=T0 + timedelta(days=10))
    await finish(store, recent)
    now = T0 + timedelta(days=10)

    assert await store.scrub(now - timedelta(days=5), now) == 2
    assert await store.scrub(now - timedelta(days=5), now) == 0  # nothing left to do

    scrubbed = await store.load(old.record.email_id)
    assert scrubbed is not None
    customer, team = scrubbed.delivery("customer"), scrubbed.delivery("bank_team")
    assert (customer.address, team.address) == ("J***@example.com", "support@bankx.com")
    assert customer.last_error == "552 <J***@example.com> mailbox full, then accepted"
    for delivery in (customer, team):
        assert (delivery.text_body, delivery.html_body, delivery.scrubbed_at) == ("", "", now)
        assert delivery.status == "sent" and delivery.subject == f"subject for {delivery.role}"
    for untouched in (pending, recent):
        loaded = await store.load(untouched.record.email_id)
        assert loaded is not None
        assert {(d.html_body, d.scrubbed_at) for d in loaded.deliveries} == {("<p>html</p>", None)}
    # The ticket is still known: the same call again is a replay, not a second email.
    again = await accept(store, "TKT-OLD", customer="Jane.Doe@example.com", at=now)
    assert again.replay and again.record.email_id == old.record.email_id


async def test_a_scrubbed_failed_delivery_is_never_requeued(store: Store) -> None:
    old = await accept(store, "TKT-OLD")
    await finish(store, old, status="failed", error="550 no such user")
    recent = await accept(store, "TKT-NEW", at=T0 + timedelta(days=10))
    await finish(store, recent, status="failed", error="550 no such user")
    now = T0 + timedelta(days=10)
    assert await store.scrub(now - timedelta(days=5), now) == 2
    # Only the unscrubbed ones go back in the queue: the scrubbed ones have no body left to send.
    assert await store.requeue(None, now, timedelta(hours=24)) == 2
    loaded = await store.load(old.record.email_id)
    assert loaded is not None and {d.status for d in loaded.deliveries} == {"failed"}


async def test_rate_slots_are_shared_between_processes(database_url: str) -> None:
    stores = [await Store.open(database_url) for _ in range(3)]
    try:
        waits = await asyncio.gather(
            *(s.take_rate_slot("acs", [(5, 60.0)], T0) for s in stores for _ in range(4))
        )
    finally:
        for s in stores:
            await s.close()
    assert sum(w == 0.0 for w in waits) == 5


async def test_migrating_a_store_in_use_concurrently_keeps_its_data_and_one_schema_version_row(
    database_url: str,
) -> None:
    first = await Store.open(database_url)
    try:
        accepted = await accept(first, "TKT-BEFORE")
    finally:
        await first.close()
    # Four processes start at once on the existing store (each migrates on open), then migrate again.
    stores = await asyncio.gather(*(Store.open(database_url) for _ in range(4)))
    try:
        await asyncio.gather(*(s.migrate() for s in stores))
        loaded = await stores[0].load(accepted.record.email_id)
    finally:
        for s in stores:
            await s.close()
    assert loaded is not None and loaded.ticket_id == "TKT-BEFORE"
    assert sorted(d.id for d in loaded.deliveries) == sorted(d.id for d in accepted.record.deliveries)
    assert await schema_version_rows(database_url) == [(1, SCHEMA_VERSION)]


#: what each earlier schema version lacked, undone from the current schema by these statements
EARLIER_SCHEMAS = {
    2: ["DROP INDEX ix_deliveries_unscrubbed", "ALTER TABLE deliveries DROP COLUMN scrubbed_at"],
    1: [
        "DROP INDEX ix_deliveries_recipient_folded",
        "CREATE INDEX ix_deliveries_recipient ON deliveries (address, created_at)",
        "DROP INDEX ix_deliveries_unscrubbed",
        "ALTER TABLE deliveries DROP COLUMN scrubbed_at",
    ],
}


@pytest.mark.parametrize("version", sorted(EARLIER_SCHEMAS))
async def test_an_earlier_store_is_upgraded_keeping_its_data_and_its_emails_count_whatever_their_case(
    database_url: str, version: int
) -> None:
    first = await Store.open(database_url)
    try:
        for i in range(2):
            await accept(first, f"TKT-OLD-{i}", customer="Jane.Doe@example.com", at=T0 + timedelta(minutes=i))
    finally:
        await first.close()
    # Back to that version as it was shipped.
    await run_sql(database_url, *EARLIER_SCHEMAS[version], f"UPDATE schema_version SET version = {version}")
    upgraded = await Store.open(database_url)
    try:
        await accept(
            upgraded, "TKT-NEW-1", cap=3, customer="jane.doe@example.com", at=T0 + timedelta(minutes=5)
        )
        with pytest.raises(RecipientLimitError, match="limit 3"):
            await accept(
                upgraded, "TKT-NEW-2", cap=3, customer="JANE.DOE@example.com", at=T0 + timedelta(minutes=6)
            )
        earlier = await accept(upgraded, "TKT-OLD-0", customer="Jane.Doe@example.com")
    finally:
        await upgraded.close()
    assert earlier.replay and earlier.record.email_id == "EMAIL-UC2-20251107-001"
    assert await schema_version_rows(database_url) == [(1, SCHEMA_VERSION)]
    names = await index_names(database_url)
    assert "ix_deliveries_recipient_folded" in names and "ix_deliveries_recipient" not in names
    assert "ix_deliveries_unscrubbed" in names
    # The new column works on the upgraded store: the old emails (both finished here) are scrubbed.
    reopened = await Store.open(database_url)
    try:
        for delivery in earlier.record.deliveries:
            await reopened.record(
                [Outcome(delivery_id=delivery.id, status="sent", transport="smtp", attempts_added=1)],
                "owner-a",
            )
        assert await reopened.scrub(T0 + timedelta(minutes=1), T0 + timedelta(days=3)) == 2
    finally:
        await reopened.close()


async def run_sql(database_url: str, *statements: str) -> None:
    """Statements run in one transaction past the store, with the database's own driver."""
    url = make_url(database_url)
    if url.drivername.startswith("sqlite"):
        with closing(sqlite3.connect(str(url.database))) as db, db:
            for statement in statements:
                db.execute(statement)
        return
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            for statement in statements:
                await conn.execute(statement)
    finally:
        await conn.close()


async def index_names(database_url: str) -> set[str]:
    url = make_url(database_url)
    if url.drivername.startswith("sqlite"):
        with closing(sqlite3.connect(str(url.database))) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
            return {str(name) for (name,) in rows}
    conn = await asyncpg.connect(database_url)
    try:
        return {str(row["indexname"]) for row in await conn.fetch("SELECT indexname FROM pg_indexes")}
    finally:
        await conn.close()


async def schema_version_rows(database_url: str) -> list[tuple[int, int]]:
    """The schema_version table, read past the store with the database's own driver."""
    url = make_url(database_url)
    query = "SELECT id, version FROM schema_version ORDER BY id"
    if url.drivername.startswith("sqlite"):
        with closing(sqlite3.connect(str(url.database))) as db:
            return [(int(i), int(v)) for i, v in db.execute(query).fetchall()]
    conn = await asyncpg.connect(database_url)
    try:
        return [(int(row["id"]), int(row["version"])) for row in await conn.fetch(query)]
    finally:
        await conn.close()
