"""The ACS path: the gateway with the acs transport against the local fake ACS service.

Measures the sendemail tool-call latency (the real azure SDK POSTs each email and
returns on the 202), and the time from the call until get_email_status shows both
emails delivered. The latter is bounded by the dispatcher's settings, not by work:
the first status check is due `first_status_check_seconds` after the send, and the
background loop looks for due work every `poll_interval_seconds`; then one GET per
email and the store update follow. For reference, one plain HTTPS request to the
fake (aiohttp, warm connection) shows what the service itself costs.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from mcp import Client

from bench.load import Result, run_async
from bench.procs import Gateway, RssSampler
from bench.sites import write_site
from bench.workloads import Calls, gateway_op

#: dispatcher settings for this row (the shipped defaults are 1 s each)
FIRST_STATUS_CHECK_SECONDS = 0.2
POLL_INTERVAL_SECONDS = 0.1
DELIVERED_SAMPLES = 12
RAW_SAMPLES = 50


@dataclass
class AcsResult:
    call: Result
    delivered: Result
    raw: Result
    peak_rss: int


async def measure(workdir: Path, seconds: float, warmup: float) -> AcsResult:
    from tests.fake_acs import FakeAcs  # the repository's fake ACS service (needs the dev extra)

    with FakeAcs(workdir / "fake-acs") as fake:
        raw = await _raw_requests(fake)
        config = write_site(
            workdir / "acs",
            {
                "dispatcher": {
                    "first_status_check_seconds": FIRST_STATUS_CHECK_SECONDS,
                    "poll_interval_seconds": POLL_INTERVAL_SECONDS,
                },
                # ACS's default quota (30/minute) would queue most of this run; the limiter stays on
                "transports": {"acs": {"rate_limits": ["100000/minute"]}},
            },
        )
        gateway = Gateway("gateway-acs", config, {"EMAIL_TRANSPORT": "acs", **fake.environment()})
        rss = RssSampler(gateway.process.pid)
        try:
            calls = Calls("acs")
            async with Client(gateway.mcp_url) as client:
                call = await run_async([gateway_op(client, calls, count_emails=False)], seconds, warmup)
                delivered = Result(clients=1)
                started_all = time.perf_counter()
                for _ in range(DELIVERED_SAMPLES):
                    delivered.latencies.append(await _until_delivered(client, calls))
                delivered.seconds = time.perf_counter() - started_all
        finally:
            peak = rss.stop()
            gateway.stop()
    return AcsResult(call=call, delivered=delivered, raw=raw, peak_rss=peak)


async def _raw_requests(fake: Any) -> Result:
    """One unauthenticated GET after another on a warm connection (the fake answers 401 at once)."""
    context = ssl.create_default_context(cafile=str(fake.ca_bundle))
    result = Result(clients=1)
    url = f"{fake.endpoint}/emails/operations/bench?api-version=2025-09-01"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        started_all = time.perf_counter()
        for n in range(RAW_SAMPLES + 5):
            started = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
            if n >= 5:  # the first ones open the connection
                result.latencies.append(time.perf_counter() - started)
        result.seconds = time.perf_counter() - started_all
    return result


async def _until_delivered(client: Client, calls: Calls, limit: float = 30.0) -> float:
    """Seconds from calling sendemail until get_email_status reports both emails delivered."""
    started = time.perf_counter()
    result = await client.call_tool("sendemail", calls.next())
    if result.is_error or not result.structured_content:
        raise RuntimeError(f"sendemail failed: {result.content}")
    email_id = result.structured_content["email_id"]
    while time.perf_counter() - started < limit:
        status = await client.call_tool("get_email_status", {"email_id": email_id})
        content = status.structured_content or {}
        if all(d["status"] == "delivered" for d in content.get("deliveries", [])):
            return time.perf_counter() - started
        await asyncio.sleep(0.01)
    raise RuntimeError(f"{email_id} was not delivered within {limit:.0f}s")
