"""The gateway's exceptions, one tree for every part of it.

    GatewayError
    ├── ConfigError                 bad configuration: start-up (or `check`) stops
    ├── InputError                  a caller's request cannot be accepted; `field` names what to fix
    │   ├── TicketConflictError     the ticket was already escalated with other content
    │   └── RecipientLimitError     too many escalation emails to one customer address
    └── DeliveryError               a transport could not hand a message over
        ├── TransientDeliveryError  try again later (4xx, timeouts, throttling); may carry retry_after
        └── PermanentDeliveryError  retrying cannot help (5xx, bad recipient, bad credentials)

Transports translate their SDK's exceptions into DeliveryError subclasses in one
place (`raise ... from err`), so the dispatcher decides on retries and failover
without knowing any provider.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration cannot work; the message names the key and what is wrong."""


class StartupError(ConfigError):
    """Plugins or templates could not be loaded at start-up."""


class InputError(GatewayError):
    """A request the gateway refuses; the message says which field and what is allowed."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TicketConflictError(InputError):
    """The same (use_case, ticket_id) was escalated before with a different payload."""


class RecipientLimitError(InputError):
    """The per-recipient hourly cap on escalation emails is reached."""


class DeliveryError(GatewayError):
    """A transport failed to hand over one message."""


class TransientDeliveryError(DeliveryError):
    """Worth retrying; `retry_after` (seconds) is the provider's hint, when it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentDeliveryError(DeliveryError):
    """Never retried on the same transport.

    `transport_level` marks failures of the transport itself (authentication,
    misconfiguration) rather than of this message: the dispatcher then fails
    over to the next transport in the chain.
    """

    def __init__(self, message: str, *, transport_level: bool = False) -> None:
        super().__init__(message)
        self.transport_level = transport_level
