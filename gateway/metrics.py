"""Prometheus metrics. Each gateway owns a registry, so tests can run several side by side.

Labels carry only configured names (use case, role, transport, outcome): never
customer data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RENDER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
CONFIRM_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.escalations = Counter(
            "escalation_requests",
            "sendemail calls by use case and result (accepted, replay, rejected)",
            ["use_case", "result"],
            registry=r,
        )
        self.emails = Counter(
            "escalation_emails",
            "Delivery outcomes by use case, role, transport and outcome (sent, delivered, failed, queued)",
            ["use_case", "role", "transport", "outcome"],
            registry=r,
        )
        self.send_attempts = Counter(
            "escalation_send_attempts",
            "Calls to a transport's send, by transport and result (ok, transient, permanent)",
            ["transport", "result"],
            registry=r,
        )
        self.retries = Counter(
            "escalation_send_retries",
            "Retries after a transient failure, by transport",
            ["transport"],
            registry=r,
        )
        self.send_latency = Histogram(
            "escalation_send_duration_seconds",
            "Time a transport took to accept one message",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.render_latency = Histogram(
            "escalation_render_duration_seconds",
            "Time to render both emails of one escalation",
            buckets=RENDER_BUCKETS,
            registry=r,
        )
        self.confirmation_latency = Histogram(
            "escalation_delivery_confirmation_seconds",
            "From acceptance to the provider's delivery confirmation",
            ["transport"],
            buckets=CONFIRM_BUCKETS,
            registry=r,
        )
        self.deliveries = Gauge(
            "escalation_deliveries",
            "Deliveries in the store by status (queued = pending)",
            ["status"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
