"""Prometheus metrics. Each gateway owns a registry, so tests can run several side by side.

Names follow the Prometheus conventions: an `escalation_` prefix, base units in
the name (`_seconds`), `_total` on counters (the client library appends it).
Labels carry only configured names (use case, role, transport) and fixed
vocabularies (outcome, result, status): never customer data, so the number of
series stays bounded whatever callers send. Treat the names as a public
interface: dashboards and alerts depend on them.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder

# One `*_created` gauge per series doubles the exposition and nobody here reads it.
disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RENDER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
CONFIRM_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

#: fixed label vocabularies (besides configured use cases, roles and transports)
REQUEST_RESULTS = ("accepted", "replay", "rejected")
EMAIL_OUTCOMES = ("sent", "delivered", "failed", "queued")
ATTEMPT_RESULTS = ("ok", "transient", "permanent")
ROLES = ("customer", "bank_team")
#: the use_case label of a call whose use case is not configured (the raw value never becomes a label)
UNKNOWN_USE_CASE = "unknown"


class Metrics:
    content_type = CONTENT_TYPE_PLAIN_0_0_4

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.escalations = Counter(
            "escalation_requests",
            "sendemail calls by use case and result: accepted (emails recorded and sent), "
            "replay (a repeated call; nothing sent again) or rejected (bad input, conflicting "
            "repeat, recipient cap). use_case is 'unknown' when the caller named none configured.",
            ["use_case", "result"],
            registry=r,
        )
        self.emails = Counter(
            "escalation_emails",
            "Email delivery outcomes as they are recorded, by use case, role (customer, bank_team), "
            "transport and outcome: sent (handed to the transport), delivered (confirmed by the "
            "provider), failed (given up), queued (left for the background dispatcher). An email "
            "that was queued and later sent counts once in each.",
            ["use_case", "role", "transport", "outcome"],
            registry=r,
        )
        self.send_attempts = Counter(
            "escalation_send_attempts",
            "Calls to a transport's send by transport and result: ok, transient (will be retried) "
            "or permanent (refused)",
            ["transport", "result"],
            registry=r,
        )
        self.retries = Counter(
            "escalation_send_retries",
            "Retries of a send inside one sendemail call after a transient failure, by transport",
            ["transport"],
            registry=r,
        )
        self.send_latency = Histogram(
            "escalation_send_duration_seconds",
            "Seconds a transport took to accept one message (one successful attempt)",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.render_latency = Histogram(
            "escalation_render_duration_seconds",
            "Seconds to render both emails (subject, text, HTML) of one sendemail call",
            buckets=RENDER_BUCKETS,
            registry=r,
        )
        self.confirmation_latency = Histogram(
            "escalation_delivery_confirmation_duration_seconds",
            "Seconds from a transport accepting a message to the provider confirming its delivery "
            "(transports that track delivery, such as acs)",
            ["transport"],
            buckets=CONFIRM_BUCKETS,
            registry=r,
        )
        self.scrubbed = Counter(
            "escalation_deliveries_scrubbed",
            "Finished deliveries whose bodies were emptied and customer address masked by the "
            "retention job (store.retention_days)",
            registry=r,
        )
        self.deliveries = Gauge(
            "escalation_deliveries",
            "Deliveries in the store by status, recounted by the dispatcher every "
            "dispatcher.gauge_refresh_seconds (10 s by default); "
            "status=queued is the pending backlog. Store-wide: replicas sharing a database report "
            "the same numbers (aggregate with max, not sum).",
            ["status"],
            registry=r,
        )

    def prime(self, use_cases: Iterable[str], transports: Iterable[str]) -> None:
        """Create the known series at zero, so rates and alerts work before the first event."""
        names = list(transports)
        for use_case in use_cases:
            for result in REQUEST_RESULTS:
                self.escalations.labels(use_case, result)
            for role in ROLES:
                for transport in names:
                    for outcome in EMAIL_OUTCOMES:
                        self.emails.labels(use_case, role, transport, outcome)
        self.escalations.labels(UNKNOWN_USE_CASE, "rejected")
        for transport in names:
            for result in ATTEMPT_RESULTS:
                self.send_attempts.labels(transport, result)
            self.retries.labels(transport)
            self.send_latency.labels(transport)

    def exposition(self) -> bytes:
        """The Prometheus text format (0.0.4)."""
        return generate_latest(self.registry)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Body and content type for a scrape, negotiated from its Accept header (text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
