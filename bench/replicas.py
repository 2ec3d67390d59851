"""Three gateway replicas sharing one PostgreSQL (stateless HTTP, JSON responses).

Runs when BENCH_DATABASE_URL or TEST_DATABASE_URL names a server: a fresh database
is created for the run and dropped afterwards. Clients are spread over the three
ports, as a load balancer would.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from bench.load import Result, run_async
from bench.procs import Gateway
from bench.sites import write_site
from bench.workloads import Calls, McpClients, gateway_op

REPLICAS = 3


def database_url() -> str | None:
    return os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL") or None


@asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new, empty database on the server of `server_url`; its URL, dropped on exit."""
    url = make_url(server_url).set(drivername="postgresql")
    name = f"bench_{int(time.time())}_{os.getpid()}"
    admin = url.render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def measure(
    workdir: Path, sink_port: int, server_url: str, clients: list[int], seconds: float, warmup: float
) -> dict[int, Result]:
    results: dict[int, Result] = {}
    async with fresh_database(server_url) as url:
        config = write_site(
            workdir / "replicas",
            {
                "server": {"stateless_http": True, "json_response": True},
                "store": {"database_url": url},
                "transports": {"smtp": {"host": "127.0.0.1", "port": sink_port}},
            },
        )
        gateways: list[Gateway] = []
        try:
            for n in range(REPLICAS):
                gateways.append(Gateway(f"replica-{n + 1}", config, {"EMAIL_TRANSPORT": "smtp"}))
            urls = [g.mcp_url for g in gateways]
            calls = Calls("pg")
            for count in clients:
                async with McpClients(urls, count) as sessions:
                    ops = [gateway_op(client, calls) for client in sessions]
                    results[count] = await run_async(ops, seconds, warmup)
        finally:
            for gateway in gateways:
                gateway.stop()
    return results
