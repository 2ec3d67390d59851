"""The acs transport's settings: `transports.acs` in config.yaml, overridden by the environment.

Every field reads one environment variable named on purpose (ACS_<FIELD>, and the
contract's AZURE_COMMUNICATION_CONNECTION_STRING), never a bare name such as
ENDPOINT that another program might have set.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from gateway.transport import TransportSettings

#: the REST API version the SDK (azure-communication-email 1.1) defaults to; send and status use the same
DEFAULT_API_VERSION = "2025-09-01"


class AcsSettings(TransportSettings):
    """Connection string (or endpoint + managed identity), trusted CA bundle, request timeout."""

    model_config = SettingsConfigDict(env_prefix="ACS_", populate_by_name=True)

    connection_string: SecretStr | None = Field(
        None,
        validation_alias="AZURE_COMMUNICATION_CONNECTION_STRING",
        description="endpoint=https://<resource>.communication.azure.com/;accesskey=<base64 key>",
    )
    endpoint: str | None = Field(
        None,
        description="ACS_ENDPOINT: the resource URL, for managed identity (needs the `identity` extra) "
        "instead of a connection string",
    )
    ca_bundle: Path | None = Field(
        None, description="ACS_CA_BUNDLE: PEM file of CAs trusted for the endpoint, instead of the system's"
    )
    request_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="ACS_REQUEST_TIMEOUT_SECONDS: connect and read timeout of one request"
    )
    api_version: str = Field(DEFAULT_API_VERSION, min_length=1, description="ACS_API_VERSION")

    @field_validator("endpoint", "ca_bundle", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("connection_string", mode="before")
    @classmethod
    def _blank_secret_is_unset(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return None if isinstance(value, str) and not value.strip() else value
