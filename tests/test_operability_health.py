"""/healthz and /readyz of a real server process: faults produced for real, not mocked.

The store outage is a real one: the gateway reaches a fresh PostgreSQL database through a
small TCP forwarder that the test shuts down (and later starts again on the same port).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import pytest
from sqlalchemy.engine import make_url

from gateway.store.schema import metadata
from tests.support import GatewayProcess, free_port, wait_for


class TcpForwarder:
    """127.0.0.1:<port> -> target, on its own event loop thread; `stop` drops every connection."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-forwarder", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=10)

    def start(self) -> TcpForwarder:
        self._server = self._call(self._listen())
        return self

    def stop(self) -> None:
        self._call(self._close())

    def shutdown(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers.update((client_writer, upstream_writer))
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer),
            self._pipe(upstream_reader, client_writer),
            return_exceptions=True,
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)


def probe(gateway: GatewayProcess, path: str) -> httpx2.Response:
    return httpx2.get(f"{gateway.url}{path}", timeout=10)


@pytest.fixture
def gateway_factory(config_factory: Callable[..., Path]) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(env: dict[str, str] | None = None, patch: dict[str, Any] | None = None) -> GatewayProcess:
        gateway = GatewayProcess(config_factory(patch), env=env or {})
        started.append(gateway)
        return gateway.start()

    yield start
    for gateway in started:
        gateway.stop()


def test_healthz_answers_200_json_while_the_process_is_alive(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    gateway = gateway_factory()
    response = probe(gateway, "/healthz")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status": "ok"}


def test_readyz_lists_store_and_each_transport_as_ok_when_usable(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    gateway = gateway_factory()
    response = probe(gateway, "/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "checks": {"store": "ok", "transport:file": "ok"}}


#: the gateway's own tables (gateway.store.schema), each with its columns
GATEWAY_TABLES = {table.name: {column.name for column in table.columns} for table in metadata.sorted_tables}


def gateway_tables_in(database_url: str) -> list[str]:
    """The tables of the gateway's schema present in this database (same name and same columns)."""

    async def read() -> list[str]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ANY($1::text[])",
                list(GATEWAY_TABLES),
            )
        finally:
            await conn.close()
        found: dict[str, set[str]] = {}
        for row in rows:
            found.setdefault(row["table_name"], set()).add(row["column_name"])
        return [name for name in GATEWAY_TABLES if found.get(name) == GATEWAY_TABLES[name]]

    return asyncio.run(read())


def drop_gateway_tables(database_url: str, names: list[str]) -> None:
    """Drop these gateway tables, dependents first (deliveries before escalations)."""

    async def drop() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            async with conn.transaction():
                for table in reversed(metadata.sorted_tables):
                    if table.name in names:
                        await conn.execute(f'DROP TABLE "{table.name}"')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture
def shared_database_kept_clean(postgres_url: str) -> Iterator[str]:
    """The shared TEST_DATABASE_URL database, with no gateway tables before or after the test.

    Tests give gateways a fresh database (`fresh_postgres_url`); tables an earlier run of this
    suite left in the shared one are dropped (only tables with the gateway's names and columns).
    """
    leftovers = gateway_tables_in(postgres_url)
    if leftovers:
        drop_gateway_tables(postgres_url, leftovers)
    yield postgres_url
    assert gateway_tables_in(postgres_url) == [], "a gateway created its tables in the shared database"


def test_readyz_fails_naming_the_store_when_postgres_is_unreachable_and_recovers(
    shared_database_kept_clean: str,
    fresh_postgres_url: str,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    real = make_url(fresh_postgres_url)
    forwarder = TcpForwarder(real.host or "127.0.0.1", real.port or 5432).start()
    try:
        through = real.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)
        gateway = gateway_factory(env={"DATABASE_URL": through})
        assert probe(gateway, "/readyz").json()["checks"]["store"] == "ok"

        forwarder.stop()  # the database goes away: listener closed, open connections dropped
        down = wait_for(
            lambda: (r := probe(gateway, "/readyz")).status_code == 503 and r,
            timeout=30,
            message="/readyz to fail once the store is unreachable",
        )
        body = down.json()
        assert body["status"] == "not ready"
        assert body["checks"]["store"].startswith("postgresql store unreachable: ")
        assert body["checks"]["transport:file"] == "ok"  # only the store is named as the problem
        assert probe(gateway, "/healthz").status_code == 200  # alive, just not ready

        forwarder.start()  # the database is back on the same address
        wait_for(
            lambda: probe(gateway, "/readyz").status_code == 200,
            timeout=30,
            message="/readyz to recover once the store is reachable again",
        )
    finally:
        forwarder.shutdown()
    assert gateway_tables_in(fresh_postgres_url) == list(GATEWAY_TABLES)  # its tables went there


def test_readyz_reports_an_unusable_transport_while_healthz_stays_200(
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    gateway = gateway_factory()
    outbox = tmp_path / "site" / "outbox"
    assert probe(gateway, "/readyz").status_code == 200

    shutil.rmtree(outbox)
    outbox.write_text("a file where the sink's directory should be")
    response = probe(gateway, "/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert body["checks"]["store"] == "ok"
    assert str(outbox) in body["checks"]["transport:file"]
    assert "not a writable directory" in body["checks"]["transport:file"]
    assert probe(gateway, "/healthz").status_code == 200

    outbox.unlink()
    outbox.mkdir()
    assert probe(gateway, "/readyz").status_code == 200
