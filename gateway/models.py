"""The shapes the MCP tools return (structuredContent and outputSchema come from these)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import tzinfo
from typing import Literal

from pydantic import BaseModel, Field

from gateway.store import DeliveryRecord, EscalationRecord
from gateway.transport import DeliveryStatus

OverallStatus = Literal["sent", "partial", "queued", "failed"]


class Recipients(BaseModel):
    customer: str = Field(description="The customer's address")
    bank_team: str = Field(description="The bank support team's address")


class DeliveryView(BaseModel):
    role: Literal["customer", "bank_team"]
    address: str
    status: DeliveryStatus = Field(description="queued, sent (accepted by the provider), delivered or failed")
    transport: str | None = Field(description="The transport that handled this email last")
    attempts: int
    message_id: str = Field(description="The email's Message-ID header; the same on every retry")
    error: str | None = Field(description="null, or what went wrong last")


class EscalationResult(BaseModel):
    """The outcome of `sendemail`, and the current state from `get_email_status`."""

    email_id: str = Field(description="EMAIL-<USE_CASE>-<YYYYMMDD>-<NNN>")
    status: OverallStatus = Field(
        description="failed: every email failed; queued: some still waiting to be sent; "
        "partial: some failed, the rest sent; sent: all sent or delivered"
    )
    sent_at: str = Field(description="When the escalation was accepted, ISO 8601 with offset")
    ticket_id: str
    use_case: str
    recipients: Recipients
    replay: bool = Field(description="True when this call repeated an earlier one and sent nothing")
    deliveries: list[DeliveryView]


def overall_status(statuses: Sequence[str]) -> OverallStatus:
    """DESIGN.md's rule, first that fits: failed, queued, partial, sent."""
    if all(s == "failed" for s in statuses):
        return "failed"
    if any(s == "queued" for s in statuses):
        return "queued"
    if any(s == "failed" for s in statuses):
        return "partial"
    return "sent"


def _view(d: DeliveryRecord) -> DeliveryView:
    return DeliveryView(
        role=d.role,
        address=d.address,
        status=d.status,
        transport=d.transport,
        attempts=d.attempts,
        message_id=d.message_id,
        error=d.last_error,
    )


def result_of(record: EscalationRecord, zone: tzinfo, *, replay: bool = False) -> EscalationResult:
    ordered = sorted(record.deliveries, key=lambda d: d.role != "customer")
    return EscalationResult(
        email_id=record.email_id,
        status=overall_status([d.status for d in ordered]),
        sent_at=record.created_at.astimezone(zone).isoformat(timespec="seconds"),
        ticket_id=record.ticket_id,
        use_case=record.use_case,
        recipients=Recipients(
            customer=record.delivery("customer").address, bank_team=record.delivery("bank_team").address
        ),
        replay=replay,
        deliveries=[_view(d) for d in ordered],
    )
