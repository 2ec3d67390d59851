"""Tables of the store. Portable SQL only: the same schema runs on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

#: Bump when the schema changes and add the step to `gateway.store.migrations.MIGRATIONS`.
SCHEMA_VERSION = 3


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC on every database, returned timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware datetimes")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC)


metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

escalations = Table(
    "escalations",
    metadata,
    Column("email_id", String(64), primary_key=True),
    Column("use_case", String(32), nullable=False),
    Column("ticket_id", String(128), nullable=False),
    Column("customer_id", String(128), nullable=False),
    Column("payload_hash", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("use_case", "ticket_id", name="uq_escalations_ticket"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("email_id", String(64), ForeignKey("escalations.email_id"), nullable=False, index=True),
    Column("use_case", String(32), nullable=False),
    Column("role", String(16), nullable=False),
    Column("address", String(320), nullable=False),
    Column("message_id", String(255), nullable=False, unique=True),
    #: queued | sent | delivered | failed
    Column("status", String(16), nullable=False),
    #: the transport that last handled (and, once sent, delivered) this message
    Column("transport", String(64)),
    Column("attempts", Integer, nullable=False, default=0),
    #: queued: when to try again; sent: when to ask the provider for confirmation
    Column("next_attempt_at", UTCDateTime),
    Column("lease_owner", String(128)),
    Column("lease_until", UTCDateTime),
    Column("last_error", Text),
    Column("provider_id", String(255)),
    Column("created_at", UTCDateTime, nullable=False),
    #: retrying stops after this (EMAIL retry horizon); a requeue moves it
    Column("give_up_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("sender", String(320), nullable=False),
    Column("subject", Text, nullable=False),
    Column("text_body", Text, nullable=False),
    Column("html_body", Text, nullable=False),
    Column("headers", Text, nullable=False),
    #: when the retention job emptied the bodies and masked the customer's address (version 3)
    Column("scrubbed_at", UTCDateTime),
    Index("ix_deliveries_due", "status", "next_attempt_at"),
    #: the retention job's look-up: not yet scrubbed, oldest first (version 3)
    Index("ix_deliveries_unscrubbed", "scrubbed_at", "created_at"),
)

#: The recipient cap counts an address whatever the case of its letters (version 2; version 1
#: indexed and counted `address` as given, so changing the case got around the cap).
recipient_index = Index(
    "ix_deliveries_recipient_folded", func.lower(deliveries.c.address), deliveries.c.created_at
)

counters = Table(
    "counters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Integer, nullable=False),
)

rate_limiters = Table(
    "rate_limiters",
    metadata,
    Column("transport", String(64), primary_key=True),
    Column("touched_at", UTCDateTime),
)

rate_events = Table(
    "rate_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("transport", String(64), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Index("ix_rate_events_transport_at", "transport", "at"),
)
