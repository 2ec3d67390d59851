"""The gateway's durable state; see `store.py`."""

from gateway.store.store import (
    SCRUB_BATCH,
    Accepted,
    DeliveryRecord,
    EscalationRecord,
    NewDelivery,
    Outcome,
    Store,
)

__all__ = ["SCRUB_BATCH", "Accepted", "DeliveryRecord", "EscalationRecord", "NewDelivery", "Outcome", "Store"]
