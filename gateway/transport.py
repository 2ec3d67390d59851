"""What a transport is: a small class that hands one finished message to a provider.

A transport receives an `OutgoingMessage` that is already rendered, addressed
and identified. It does not render, retry or record: the dispatcher does. It maps
its provider's answers onto the gateway's few statuses and its SDK's exceptions
onto `gateway.errors` in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import Any, ClassVar, Literal

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DeliveryStatus = Literal["queued", "sent", "delivered", "failed"]


@dataclass(frozen=True)
class OutgoingMessage:
    """One email, final: the same object (and the same Message-ID) on every retry."""

    delivery_id: str
    message_id: str
    sender: str
    recipients: tuple[str, ...]
    subject: str
    text: str
    html: str
    date: datetime
    headers: Mapping[str, str] = field(default_factory=dict)

    def to_mime(self) -> EmailMessage:
        """RFC 5322 multipart/alternative (text/plain + text/html), UTF-8."""
        msg = EmailMessage(policy=SMTP)
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Subject"] = self.subject
        msg["Date"] = format_datetime(self.date)
        msg["Message-ID"] = self.message_id
        for name, value in self.headers.items():
            msg[name] = value
        msg.set_content(self.text, subtype="plain", charset="utf-8", cte="quoted-printable")
        msg.add_alternative(self.html, subtype="html", charset="utf-8", cte="quoted-printable")
        return msg

    def as_bytes(self) -> bytes:
        return self.to_mime().as_bytes()


@dataclass(frozen=True)
class Receipt:
    """What a provider answered when it took the message.

    `status` is `sent` (accepted, delivery still to be confirmed) or `delivered`.
    `provider_id` is the provider's reference, used later by `Transport.status`.
    """

    status: DeliveryStatus = "sent"
    provider_id: str | None = None


@dataclass(frozen=True)
class StatusUpdate:
    """A delivery confirmation: `sent` means not final yet (ask again after `retry_after`)."""

    status: DeliveryStatus
    error: str | None = None
    retry_after: float | None = None


class TransportSettings(BaseSettings):
    """Base for a transport's settings: the config block `transports.<name>`, overridden by
    the environment. Unknown keys are refused; secrets belong in `SecretStr` fields."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix="", case_sensitive=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over config.yaml, as everywhere else in the gateway.
        return (env_settings, init_settings)


class Transport:
    """Base class for transports. Subclasses set `name` and usually `settings_model`.

    Contract: `send` raises `TransientDeliveryError` or `PermanentDeliveryError`
    (never an SDK exception), `start` never waits for a server, `check` raises
    `DeliveryError` when the transport is not usable right now.
    """

    name: ClassVar[str] = ""
    settings_model: ClassVar[type[TransportSettings]] = TransportSettings
    #: True when `status` can confirm delivery after `send` returned `sent`.
    tracks_delivery: ClassVar[bool] = False

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    async def start(self) -> None:
        """Prepare clients or pools; must not wait for the provider to answer."""

    async def send(self, message: OutgoingMessage) -> Receipt:
        raise NotImplementedError

    async def status(self, receipt: Receipt) -> StatusUpdate:
        """Ask the provider what became of an accepted message."""
        return StatusUpdate(status=receipt.status)

    async def check(self) -> None:
        """Raise a `DeliveryError` when the transport is unusable now (for /readyz)."""

    async def aclose(self) -> None:
        """Release connections; called once at shutdown."""
