"""Schema creation and upgrades, run inside one transaction at start-up.

The caller holds a database-wide lock (PostgreSQL advisory lock; SQLite's write
lock), so replicas starting together apply each step once. To change the schema:
bump `SCHEMA_VERSION` in `schema.py` and add a function here keyed by the version
it upgrades *from*.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import insert, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateColumn

from gateway.errors import ConfigError
from gateway.store.schema import SCHEMA_VERSION, deliveries, metadata, recipient_index, schema_version


def _fold_recipient_index(conn: Connection) -> None:
    """1 -> 2: the recipient cap's index on the lower-cased address replaces the one on it as given."""
    conn.execute(text("DROP INDEX IF EXISTS ix_deliveries_recipient"))
    recipient_index.create(conn)


def _add_scrubbed_at(conn: Connection) -> None:
    """2 -> 3: deliveries get `scrubbed_at` (retention) and the retention job's index."""
    column = CreateColumn(deliveries.c.scrubbed_at).compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE deliveries ADD COLUMN {column}"))
    next(i for i in deliveries.indexes if i.name == "ix_deliveries_unscrubbed").create(conn)


#: version -> step that upgrades a database at that version to version + 1
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _fold_recipient_index, 2: _add_scrubbed_at}


def upgrade(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)
    current = conn.scalar(select(schema_version.c.version).where(schema_version.c.id == 1))
    if current is None:
        conn.execute(insert(schema_version).values(id=1, version=SCHEMA_VERSION))
        return
    if current > SCHEMA_VERSION:
        raise ConfigError(
            f"the database schema is version {current}, newer than this gateway's {SCHEMA_VERSION}; "
            "upgrade the gateway before pointing it at this database"
        )
    while current < SCHEMA_VERSION:
        MIGRATIONS[current](conn)
        current += 1
        conn.execute(update(schema_version).where(schema_version.c.id == 1).values(version=current))
