"""SMTP transport plugin: any SMTP server, from a local aiosmtpd to a bank's own relay.

Registered through the `gateway` entry point (`smtp = "gateway_smtp"`), so
`EMAIL_TRANSPORT=smtp` (or a chain such as `acs,smtp`) selects it. Settings come
from `transports.smtp` in config.yaml and the SMTP_* environment variables
(`gateway_smtp.settings`); failures map onto the gateway's error tree in
`gateway_smtp.errors`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.hookspecs import hookimpl
from gateway_smtp.settings import SMTPSettings
from gateway_smtp.transport import SMTPTransport

__all__ = ["SMTPSettings", "SMTPTransport"]


@hookimpl
def register_transports(register: Callable[[type[Any]], None]) -> None:
    register(SMTPTransport)
