"""SMTP transport settings: the `transports.smtp` block of config.yaml, overridden by SMTP_* variables.

Every field can be set from the environment as SMTP_<FIELD> (SMTP_HOST, SMTP_PORT,
SMTP_USERNAME, SMTP_PASSWORD, SMTP_SECURITY, SMTP_CA_BUNDLE, SMTP_POOL_SIZE, ...).
The password is a `SecretStr`: it prints as `**********` and never reaches a log.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from gateway.errors import ConfigError
from gateway.transport import TransportSettings

Security = Literal["none", "starttls", "tls"]


class SMTPSettings(TransportSettings):
    """How to reach one SMTP server (a local aiosmtpd, or the bank's own relay)."""

    model_config = SettingsConfigDict(env_prefix="SMTP_")

    host: str = "127.0.0.1"
    port: int = Field(8025, ge=1, le=65535)
    #: SMTP AUTH user; with `password`, the transport logs in after connecting (and after STARTTLS)
    username: str | None = None
    password: SecretStr | None = None
    #: none: plain SMTP (never upgraded); starttls: upgrade or fail; tls: TLS from the first byte (465)
    security: Security = "none"
    #: PEM file of CA certificates trusted in addition to the system's (a private relay's CA)
    ca_bundle: FilePath | None = None
    #: false only for a lab relay with a self-signed certificate: turns off certificate and name checks
    validate_certs: bool = True
    #: client certificate (and key) for relays that authenticate clients by certificate
    client_cert: FilePath | None = None
    client_key: FilePath | None = None
    #: the name sent in EHLO; default: this machine's fully qualified name
    local_hostname: str | None = None
    #: TCP connect, TLS handshake and the server's greeting
    connect_timeout_seconds: float = Field(10.0, gt=0, le=300)
    #: each command (EHLO, AUTH, MAIL, RCPT, DATA...) waiting for the server's reply
    command_timeout_seconds: float = Field(30.0, gt=0, le=600)
    #: the /readyz probe (connect or NOOP); keep it below the gateway's 3 s readiness budget
    check_timeout_seconds: float = Field(2.0, gt=0, le=30)
    #: persistent connections shared by all concurrent sends (the most the server ever sees)
    pool_size: int = Field(4, ge=1, le=100)
    #: a pooled connection unused this long is closed instead of reused (servers drop idle clients)
    idle_timeout_seconds: float = Field(30.0, gt=0)
    #: reconnect after this many messages on one connection (0: no limit); some relays cap it
    max_messages_per_connection: int = Field(0, ge=0)

    @field_validator("username", "local_hostname", "ca_bundle", "client_cert", "client_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # SMTP_USERNAME= in a shell or an empty YAML value means "not set", not "empty user".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("password", mode="before")
    @classmethod
    def _blank_password_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value == "" else value

    @field_validator("security", mode="before")
    @classmethod
    def _security(cls, value: Any) -> Any:
        choice = value.strip().lower() if isinstance(value, str) else value
        if choice not in ("none", "starttls", "tls"):
            raise ValueError(
                f"{value!r} is not a security mode; use none, starttls (port 587) or tls (port 465) "
                "(SMTP_SECURITY)"
            )
        return choice

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() or ord(c) < 32 for c in value) or "/" in value:
            raise ValueError("give a host name or IP address such as smtp.bank.internal or 127.0.0.1")
        return value

    @field_validator("local_hostname")
    @classmethod
    def _ehlo_name(cls, value: str | None) -> str | None:
        if value is not None and any(c.isspace() or ord(c) < 32 or ord(c) > 126 for c in value.strip()):
            raise ValueError("an EHLO name is one ASCII word such as mail-gw.bank.internal")
        return value.strip() if value else value

    @model_validator(mode="after")
    def _pairs(self) -> SMTPSettings:
        if self.password is not None and self.username is None:
            raise ValueError("password is set but username is not (SMTP_USERNAME); set both or neither")
        if self.username is not None and self.password is None:
            raise ValueError("username is set but password is not (SMTP_PASSWORD); set both or neither")
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        return self

    @property
    def address(self) -> str:
        """host:port, for messages."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext | None:
        """The client TLS context for starttls/tls (None for plain SMTP); built once at start-up."""
        if self.security == "none":
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if not self.validate_certs:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            if self.ca_bundle is not None:
                context.load_verify_locations(cafile=str(self.ca_bundle))
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(
                f"transports.smtp.ca_bundle: {_shown(self.ca_bundle)} holds no usable PEM certificate ({err})"
            ) from None
        try:
            if self.client_cert is not None:
                key = str(self.client_key) if self.client_key is not None else None
                # An encrypted key must not make OpenSSL prompt on the terminal: it fails here instead.
                context.load_cert_chain(str(self.client_cert), keyfile=key, password=lambda: b"")
        except (ssl.SSLError, OSError) as err:
            raise ConfigError(
                f"transports.smtp.client_cert: cannot load {_shown(self.client_cert)} "
                f"with its key ({err.__class__.__name__})"
            ) from None
        return context


def _shown(path: Path | None) -> str:
    return str(path) if path is not None else "-"
