from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from gateway.app import Gateway
from gateway.config import Settings, load_settings
from tests.support import GATEWAY_LOGS, clean_env, full_customer_addresses, is_gateway_variable, write_config


@pytest.fixture(autouse=True)
def _no_gateway_variables_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set what they need; a developer's SMTP_HOST or FILE_SINK_DIR must not leak in."""
    for name in [n for n in os.environ if is_gateway_variable(n)]:
        monkeypatch.delenv(name)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def config_factory(tmp_path: Path) -> Callable[..., Path]:
    """Write a config tree (config.yaml + templates/) under tmp_path, with a patch merged in."""

    def make(patch: dict[str, Any] | None = None, name: str = "site") -> Path:
        return write_config(tmp_path / name, patch)

    return make


@pytest.fixture
def settings_factory(config_factory: Callable[..., Path]) -> Callable[..., Settings]:
    def make(patch: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
        return load_settings(config_factory(patch), env=clean_env(env))

    return make


@pytest.fixture
async def running_gateway(settings_factory: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """An in-process gateway, started with the background dispatcher: `async with running_gateway(...)`."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def start(
        patch: dict[str, Any] | None = None, env: dict[str, str] | None = None, background: bool = True
    ) -> AsyncIterator[Gateway]:
        gateway = Gateway(settings_factory(patch, env))
        async with gateway.running(background=background):
            yield gateway

    yield start


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.skip("TEST_DATABASE_URL is not set: PostgreSQL tests need a real server (.ci/run sets it)")
    return url


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for one test (dropped afterwards)."""
    name = f"gw_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(postgres_url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(url: str, statement: str) -> None:
    import asyncpg

    parsed = make_url(url)
    conn = await asyncpg.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password,
        database=parsed.database or "postgres",
    )
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The logs of the whole run hold no full customer address (issue: privacy in logs).

    Every gateway process a test started wrote its log to a file; any customer address in
    one of them, unmasked, fails the run."""
    found: dict[str, set[str]] = {}
    for path in dict.fromkeys(GATEWAY_LOGS):
        if path.exists():
            leaked = full_customer_addresses(path.read_text(errors="replace"))
            if leaked:
                found[str(path)] = leaked
    if found:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"{path}: {sorted(addresses)}" for path, addresses in found.items()]
        message = "full customer addresses in gateway logs:\n  " + "\n  ".join(lines)
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
