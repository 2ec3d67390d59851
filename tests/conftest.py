from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import Settings, load_settings
from tests.support import clean_env, write_config


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
