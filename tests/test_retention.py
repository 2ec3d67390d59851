"""Retention: old finished deliveries lose their bodies and the customer's address, tickets stay."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_settings
from gateway.dispatcher import now_utc
from gateway.errors import ConfigError
from gateway.store import Store
from tests.support import clean_env
from tests.test_cli import cli
from tests.test_store import accept, finish

pytestmark = pytest.mark.anyio


async def old_finished_escalation(database_url: str, days_ago: int, ticket: str = "TKT-OLD") -> str:
    """An escalation recorded `days_ago` days ago whose two emails were sent; its email_id."""
    store = await Store.open(database_url)
    try:
        at = now_utc() - timedelta(days=days_ago)
        accepted = await accept(store, ticket, customer="Jane.Doe@example.com", at=at)
        await finish(store, accepted)
        return accepted.record.email_id
    finally:
        await store.close()


async def test_the_running_gateway_scrubs_deliveries_past_retention_and_keeps_the_others(
    running_gateway: Callable[..., Any], settings_factory: Callable[..., Any]
) -> None:
    patch = {"store": {"retention_days": 30}}
    database_url = settings_factory(patch).store.database_url
    old = await old_finished_escalation(database_url, days_ago=31, ticket="TKT-OLD")
    recent = await old_finished_escalation(database_url, days_ago=29, ticket="TKT-RECENT")
    async with running_gateway(patch) as gateway:
        for _ in range(100):  # the dispatcher's first round scrubs; no waiting for the hourly one
            scrubbed = await gateway.store.load(old)
            assert scrubbed is not None
            if all(d.scrubbed_at for d in scrubbed.deliveries):
                break
            await asyncio.sleep(0.05)
        kept = await gateway.store.load(recent)
        scrubbed_count = gateway.metrics.registry.get_sample_value("escalation_deliveries_scrubbed_total")
    assert scrubbed.delivery("customer").address == "J***@example.com"
    assert {d.html_body for d in scrubbed.deliveries} == {""}
    assert kept is not None and kept.delivery("customer").address == "Jane.Doe@example.com"
    assert {d.scrubbed_at for d in kept.deliveries} == {None}
    assert scrubbed_count == 2


def test_retention_must_outlast_the_retry_horizon(config_factory: Callable[..., Path]) -> None:
    config = config_factory({"store": {"retention_days": 1}, "email": {"retry_horizon_hours": 24}})
    with pytest.raises(
        ConfigError, match=r"store.retention_days \(1\) must be longer than email.retry_horizon_hours"
    ):
        load_settings(config, env=clean_env())


def test_deliveries_scrub_command_scrubs_old_deliveries_and_status_shows_them_masked(
    config_factory: Callable[..., Path],
) -> None:
    config = config_factory()
    database_url = load_settings(config, env=clean_env()).store.database_url
    email_id = asyncio.run(old_finished_escalation(database_url, days_ago=10))

    refused = cli("deliveries", "scrub", config=config)
    assert refused.returncode == 1 and "--older-than-days" in refused.stderr
    too_soon = cli("deliveries", "scrub", "--older-than-days", "1", config=config)
    assert too_soon.returncode == 1 and "retry_horizon_hours" in too_soon.stderr

    kept = cli("deliveries", "scrub", "--older-than-days", "11", config=config)
    assert kept.returncode == 0 and "scrubbed 0 " in kept.stdout, kept.stderr
    done = cli("deliveries", "scrub", "--older-than-days", "9", config=config)
    assert done.returncode == 0 and "scrubbed 2 finished deliveries older than 9 days" in done.stdout, (
        done.stderr
    )
    status = json.loads(cli("status", email_id, config=config).stdout)
    assert status["recipients"]["customer"] == "J***@example.com"
    assert [d["status"] for d in status["deliveries"]] == ["sent", "sent"]
