"""acs transport plugin: Azure Communication Services Email (`EMAIL_TRANSPORT=acs`).

Settings (`transports.acs` in config.yaml; the environment wins):
AZURE_COMMUNICATION_CONNECTION_STRING, or ACS_ENDPOINT for managed identity (the
`identity` extra); ACS_CA_BUNDLE; ACS_REQUEST_TIMEOUT_SECONDS; ACS_API_VERSION.
"""

from __future__ import annotations

from typing import Any

from gateway.hookspecs import hookimpl
from gateway_acs.settings import AcsSettings
from gateway_acs.transport import AcsTransport

__all__ = ["AcsSettings", "AcsTransport"]


@hookimpl
def register_transports(register: Any) -> None:
    register(AcsTransport)
