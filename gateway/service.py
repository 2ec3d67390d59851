"""The escalation service: validate, dedupe, render, record, then send.

Nothing is sent before the escalation and both deliveries are recorded in one
transaction, so whatever the caller was told was accepted survives a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

from gateway.config import Settings
from gateway.dispatcher import Dispatcher
from gateway.errors import InputError
from gateway.logs import mask_address
from gateway.metrics import Metrics
from gateway.models import EscalationResult, result_of
from gateway.renderer import ROLES, Renderer
from gateway.store import NewDelivery, Store
from gateway.transport import OutgoingMessage
from gateway.validation import Limits, check_request

log = logging.getLogger("gateway.service")


class EscalationService:
    def __init__(
        self, settings: Settings, renderer: Renderer, store: Store, dispatcher: Dispatcher, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.renderer = renderer
        self.store = store
        self.dispatcher = dispatcher
        self.metrics = metrics
        v = settings.validation
        self.limits = Limits(
            v.ticket_id_pattern, v.customer_id_pattern, v.query_max_chars, v.reason_max_chars
        )
        self._domain = settings.email.sender.rpartition("@")[2]

    def use_case_of(self, value: object) -> str:
        configured = list(self.settings.use_cases)
        name = value.strip().upper() if isinstance(value, str) else ""
        if name not in self.settings.use_cases:
            shown = repr(value)[:40] if value else "missing"
            raise InputError(
                f"use_case {shown} is not configured; use one of: {', '.join(configured)}", field="use_case"
            )
        return name

    async def sendemail(
        self, *, ticket_id: str, customer_id: str, customer_email: str, query: str, use_case: str, reason: str
    ) -> EscalationResult:
        name: str | None = None
        try:
            name = self.use_case_of(use_case)
            request = check_request(
                ticket_id=ticket_id,
                customer_id=customer_id,
                customer_email=customer_email,
                query=query,
                reason=reason,
                limits=self.limits,
            )
        except InputError:
            self.metrics.escalations.labels(name or "unknown", "rejected").inc()
            raise
        context = {"ticket_id": request["ticket_id"], "use_case": name}

        created_at = datetime.now(UTC)
        local = created_at.astimezone(self.settings.zone)
        started = time.perf_counter()
        messages = [self._compose(name, role, request, created_at, local) for role in ROLES]
        self.metrics.render_latency.observe(time.perf_counter() - started)

        try:
            accepted = await self.store.accept(
                use_case=name,
                ticket_id=request["ticket_id"],
                customer_id=request["customer_id"],
                payload_hash=_payload_hash(name, request),
                created_at=created_at,
                local_day=local.strftime("%Y%m%d"),
                new_deliveries=messages,
                # The bank's own team address is never capped, even when given as the customer's
                # (in any case: the cap counts addresses case-insensitively).
                recipient_cap=None
                if request["customer_email"].lower() == self.settings.email.support_team.lower()
                else self.settings.email.per_recipient_hourly_cap,
                lease_owner=self.dispatcher.owner,
                lease_until=self.dispatcher.lease_until(created_at),
                give_up_at=created_at + timedelta(hours=self.settings.email.retry_horizon_hours),
            )
        except InputError:
            self.metrics.escalations.labels(name, "rejected").inc()
            raise
        record = accepted.record
        context["email_id"] = record.email_id
        if accepted.replay:
            self.metrics.escalations.labels(name, "replay").inc()
            log.info("Repeated call for ticket %s: nothing sent again", request["ticket_id"], extra=context)
            return result_of(record, self.settings.zone, replay=True)

        self.metrics.escalations.labels(name, "accepted").inc()
        log.info("Sending email for ticket %s (%s)", request["ticket_id"], name, extra=context)
        record.deliveries = await self.dispatcher.send_now(record.deliveries, context)
        for delivery in record.deliveries:
            self.metrics.emails.labels(
                name, delivery.role, delivery.transport or "none", delivery.status
            ).inc()
        result = result_of(record, self.settings.zone)
        log.info(
            "Escalation %s: %s",
            record.email_id,
            result.status,
            extra={**context, "status": result.status, "recipient": mask_address(request["customer_email"])},
        )
        return result

    async def status(self, email_id: str) -> EscalationResult:
        email_id = email_id.strip() if isinstance(email_id, str) else ""
        record = await self.store.load(email_id) if email_id else None
        if record is None:
            raise InputError(
                f"email_id {email_id[:64]!r} is unknown; pass the email_id that sendemail returned "
                "(like EMAIL-UC2-20251107-001)",
                field="email_id",
            )
        return result_of(record, self.settings.zone)

    def _compose(
        self, use_case: str, role: str, request: dict[str, str], created_at: datetime, local: datetime
    ) -> NewDelivery:
        rendered = self.renderer.render(use_case, role, request, local)
        delivery_id = str(uuid.uuid4())
        to = request["customer_email"] if role == "customer" else self.settings.email.support_team
        message = OutgoingMessage(
            delivery_id=delivery_id,
            message_id=f"<{delivery_id}@{self._domain}>",
            sender=self.settings.email.sender,
            recipients=(to,),
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            date=created_at,
            headers={
                "X-Ticket-ID": request["ticket_id"],
                "X-Escalation-Use-Case": use_case,
                "Auto-Submitted": "auto-generated",
            },
        )
        return NewDelivery(id=delivery_id, role=role, message=message)


def _payload_hash(use_case: str, request: dict[str, str]) -> str:
    canonical = json.dumps([use_case, *(request[k] for k in sorted(request))], ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
