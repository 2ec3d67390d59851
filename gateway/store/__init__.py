"""The gateway's durable state; see `store.py`."""

from gateway.store.store import (
    Accepted,
    DeliveryRecord,
    EscalationRecord,
    NewDelivery,
    Outcome,
    Store,
)

__all__ = ["Accepted", "DeliveryRecord", "EscalationRecord", "NewDelivery", "Outcome", "Store"]
