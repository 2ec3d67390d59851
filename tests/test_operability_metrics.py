"""/metrics of a real server after real MCP calls: counters move with the right labels, no customer data."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.app import Gateway
from gateway.errors import TransientDeliveryError
from gateway.hookspecs import hookimpl
from gateway.metrics import Metrics
from gateway.plugins import registered
from gateway.transport import OutgoingMessage, Receipt, Transport, TransportSettings
from tests.support import ROOT, SAMPLE_CALL, GatewayProcess, wait_for

CUSTOMER = "ana.lopez@customer-mail.example"
UC2_CALL = {**SAMPLE_CALL, "customer_email": CUSTOMER, "query": "Quel est le taux fixe sur 20 ans ?"}
UC3_CALL = {
    **SAMPLE_CALL,
    "ticket_id": "TKT-2025-009876",
    "customer_id": "CUST-4711",
    "customer_email": CUSTOMER,
    "use_case": "UC3",
    "query": "Plan my retirement savings and my daughter's tuition together",
    "reason": "Complex multi-topic requiring human advisor",
}
ALLOWED_LABELS = {"use_case", "role", "transport", "outcome", "result", "status", "le"}


def scrape(gateway: GatewayProcess) -> dict[str, list[Sample]]:
    """Families by name, parsed with the Prometheus client's own parser."""
    response = httpx2.get(f"{gateway.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def value(families: dict[str, list[Sample]], sample_name: str, **labels: str) -> float:
    family = re.sub(r"_(total|bucket|count|sum)$", "", sample_name)
    matches = [s.value for s in families.get(family, []) if s.name == sample_name and s.labels == labels]
    assert len(matches) == 1, f"expected one {sample_name}{labels}, found {len(matches)}"
    return matches[0]


@pytest.fixture
def gateway(config_factory: Callable[..., Path]) -> Iterator[GatewayProcess]:
    # A short gauge recount, so the backlog gauge can be watched moving within a test.
    patch = {"dispatcher": {"poll_interval_seconds": 0.1, "gauge_refresh_seconds": 0.2}}
    with GatewayProcess(config_factory(patch)) as process:
        yield process


async def call(url: str, arguments: dict[str, Any]) -> Any:
    async with Client(url) as client:
        return await client.call_tool("sendemail", arguments)


@pytest.mark.anyio
async def test_metrics_after_real_calls_count_requests_and_emails_with_their_labels(
    gateway: GatewayProcess,
) -> None:
    first = await call(gateway.mcp_url, UC2_CALL)
    assert not first.is_error and first.structured_content["status"] == "sent"
    replay = await call(gateway.mcp_url, UC2_CALL)
    assert replay.structured_content["replay"] is True
    assert not (await call(gateway.mcp_url, UC3_CALL)).is_error
    bad_address = await call(
        gateway.mcp_url, {**UC3_CALL, "ticket_id": "TKT-2025-000001", "customer_email": "ana@"}
    )
    assert bad_address.is_error
    unknown = await call(gateway.mcp_url, {**UC2_CALL, "ticket_id": "TKT-2025-000002", "use_case": "UC9"})
    assert unknown.is_error

    m = scrape(gateway)
    requests = "escalation_requests_total"
    assert value(m, requests, use_case="UC2", result="accepted") == 1
    assert value(m, requests, use_case="UC2", result="replay") == 1
    assert value(m, requests, use_case="UC2", result="rejected") == 0
    assert value(m, requests, use_case="UC3", result="accepted") == 1
    assert value(m, requests, use_case="UC3", result="rejected") == 1
    assert value(m, requests, use_case="unknown", result="rejected") == 1  # never the caller's raw value

    emails = "escalation_emails_total"
    for use_case in ("UC2", "UC3"):
        for role in ("customer", "bank_team"):
            labels = {"use_case": use_case, "role": role, "transport": "file"}
            assert value(m, emails, **labels, outcome="sent") == 1  # the replay sent nothing
            assert value(m, emails, **labels, outcome="failed") == 0
    assert value(m, "escalation_send_attempts_total", transport="file", result="ok") == 4
    assert value(m, "escalation_send_attempts_total", transport="file", result="transient") == 0
    assert value(m, "escalation_send_retries_total", transport="file") == 0

    assert value(m, "escalation_send_duration_seconds_count", transport="file") == 4
    assert value(m, "escalation_send_duration_seconds_sum", transport="file") > 0
    assert value(m, "escalation_render_duration_seconds_count") >= 2
    assert value(m, "escalation_render_duration_seconds_sum") > 0

    # The dispatcher's next recount publishes the store's counts: both escalations' four emails are sent.
    wait_for(
        lambda: value(scrape(gateway), "escalation_deliveries", status="sent") == 4,
        timeout=30,
        message="escalation_deliveries{status=sent} to reach 4",
    )
    assert value(scrape(gateway), "escalation_deliveries", status="queued") == 0


@pytest.mark.anyio
async def test_metrics_exposition_holds_no_customer_data_and_follows_naming_conventions(
    gateway: GatewayProcess,
) -> None:
    await call(gateway.mcp_url, UC2_CALL)
    await call(gateway.mcp_url, UC3_CALL)
    await call(gateway.mcp_url, {**UC3_CALL, "ticket_id": "TKT-2025-000003", "customer_email": "ana@"})
    text = httpx2.get(f"{gateway.url}/metrics", timeout=10).text

    for secret in (
        CUSTOMER,
        "ana.lopez",
        "customer-mail",
        UC2_CALL["query"],
        UC3_CALL["query"][:20],
        "CUST-4711",
        "TKT-2025",
        "ana@",
    ):
        assert secret not in text, f"{secret!r} leaked into /metrics"

    families = list(text_string_to_metric_families(text))
    assert {f.name for f in families} >= {
        "escalation_requests",
        "escalation_emails",
        "escalation_send_attempts",
        "escalation_send_retries",
        "escalation_send_duration_seconds",
        "escalation_render_duration_seconds",
        "escalation_delivery_confirmation_duration_seconds",
        "escalation_deliveries",
        "escalation_deliveries_scrubbed",
    }
    for family in families:
        assert family.name.startswith("escalation_"), family.name
        assert family.documentation, f"{family.name} has no help text"
        if family.type == "counter":
            assert all(s.name == f"{family.name}_total" for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), f"{family.name}: a histogram of durations in seconds"
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, f"{sample.name} has labels {sample.labels}"
            if "use_case" in sample.labels:
                assert sample.labels["use_case"] in {"UC2", "UC3", "unknown"}


@pytest.mark.anyio
async def test_metrics_speaks_openmetrics_to_a_scraper_that_asks_for_it(gateway: GatewayProcess) -> None:
    await call(gateway.mcp_url, UC2_CALL)
    response = httpx2.get(
        f"{gateway.url}/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(response.text)}
    sent = [
        s.value
        for s in families["escalation_emails"].samples
        if s.name == "escalation_emails_total" and s.labels.get("outcome") == "sent"
    ]
    assert sorted(sent) == [0, 0, 1, 1]  # UC2's two emails; UC3's series exist at zero


class _FlakyTransport(Transport):
    """Fails each message's first attempt with a transient error, then accepts it."""

    name = "flaky"
    settings_model = TransportSettings
    seen: set[str] = set()

    async def send(self, message: OutgoingMessage) -> Receipt:
        if message.delivery_id not in self.seen:
            self.seen.add(message.delivery_id)
            raise TransientDeliveryError("421 try again later")
        return Receipt(status="sent", provider_id=message.delivery_id)


class _FlakyPlugin:
    @hookimpl
    def register_transports(self, register: Any) -> None:
        register(_FlakyTransport)


@pytest.mark.anyio
async def test_transient_failures_count_as_retries_and_transient_attempts(
    running_gateway: Callable[..., Any],
) -> None:
    with registered(_FlakyPlugin(), "flaky-test-transport"):
        patch = {"email": {"transport": "flaky"}, "transports": {"flaky": {}}}
        gateway: Gateway
        async with running_gateway(patch, background=False) as gateway:
            result = await gateway.service.sendemail(**UC2_CALL)
            assert result.status == "sent"
            metrics: Metrics = gateway.metrics
            families = {
                f.name: f.samples for f in text_string_to_metric_families(metrics.exposition().decode())
            }
    assert value(families, "escalation_send_retries_total", transport="flaky") == 2
    assert value(families, "escalation_send_attempts_total", transport="flaky", result="transient") == 2
    assert value(families, "escalation_send_attempts_total", transport="flaky", result="ok") == 2
    assert value(families, "escalation_send_duration_seconds_count", transport="flaky") == 2
    for role in ("customer", "bank_team"):
        labels = {"use_case": "UC2", "role": role, "transport": "flaky"}
        assert value(families, "escalation_emails_total", **labels, outcome="sent") == 1


def test_every_metric_is_documented_in_the_operations_guide() -> None:
    guide = (ROOT / "README.md").read_text()
    names = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics().registry.collect()
    }
    assert names, "the registry is empty"
    undocumented = sorted(name for name in names if f"`{name}`" not in guide)
    assert not undocumented, f"README.md does not describe {undocumented}"
