"""Settings: `config.yaml` plus the contract's environment variables, validated once.

The YAML file is the base; each environment variable in `ENV_OVERRIDES` replaces
one key. Unknown keys and bad values stop start-up with the key's path (and the
variable that set it) in the message. Transport blocks (`transports.<name>`) are
validated by the transport's own settings model, see `gateway.plugins`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from gateway.errors import ConfigError
from gateway.validation import check_address

DEFAULT_CONFIG_NAME = "config.yaml"

#: environment variable -> key path in the settings tree
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "PROFILE": ("profile",),
    "HOST": ("server", "host"),
    "PORT": ("server", "port"),
    "MCP_AUTH_TOKEN": ("server", "auth_tokens"),
    "EMAIL_TRANSPORT": ("email", "transport"),
    "SENDER_EMAIL": ("email", "sender"),
    "SUPPORT_TEAM_EMAIL": ("email", "support_team"),
    "EMAIL_RETRY_COUNT": ("email", "retry_count"),
    "EMAIL_TIMEOUT_SECONDS": ("email", "timeout_seconds"),
    "DATABASE_URL": ("store", "database_url"),
    "LOG_LEVEL": ("logging", "level"),
}
#: variables holding a comma-separated list
LIST_VARIABLES = {"MCP_AUTH_TOKEN", "EMAIL_TRANSPORT"}


class Section(BaseModel):
    """A config section: unknown keys are refused, values validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8078, ge=0, le=65535)
    stateless_http: bool = False
    json_response: bool = False
    allowed_hosts: list[str] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)
    auth_tokens: list[SecretStr] = Field(default_factory=list)
    auth_token_file: Path | None = None
    metrics_require_auth: bool = False
    shutdown_grace_seconds: float = Field(10.0, ge=0)


class EmailSettings(Section):
    sender: str = "noreply@bankx.com"
    support_team: str = "support@bankx.com"
    transport: list[str] | None = None
    retry_count: int = Field(3, ge=1, le=20)
    timeout_seconds: float = Field(30.0, gt=0, le=600)
    retry_horizon_hours: float = Field(24.0, gt=0)
    per_recipient_hourly_cap: int = Field(10, ge=1)
    timezone: str = "Asia/Bangkok"

    @field_validator("sender", "support_team")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value)

    @field_validator("transport", mode="before")
    @classmethod
    def _split_chain(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if value is not None and not value:
            raise ValueError("name at least one transport")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as Asia/Bangkok") from None
        return value


#: DATABASE_URL schemes the store runs on
SQLITE_SCHEMES = ("sqlite", "sqlite+pysqlite", "sqlite+aiosqlite")
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")


class StoreSettings(Section):
    database_url: str = "sqlite:///var/gateway.db"
    #: finished deliveries older than this lose their bodies and the customer's address (None: kept)
    retention_days: int | None = Field(None, ge=1)

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: str) -> str:
        hint = "use sqlite:///path/to/file.db or postgresql://user:password@host:5432/db"
        try:
            url = make_url(value)
            url.port  # noqa: B018 - parsing the port is the check
        except (ArgumentError, ValueError):
            raise ValueError(f"not a database URL; {hint}") from None
        if url.drivername not in (*SQLITE_SCHEMES, *POSTGRES_SCHEMES):
            raise ValueError(f"unsupported database {url.drivername!r}; {hint}")
        return value


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    json_lines: bool | None = None

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class DispatcherSettings(Section):
    poll_interval_seconds: float = Field(1.0, gt=0)
    batch_size: int = Field(50, ge=1)
    concurrency: int = Field(16, ge=1)
    max_backoff_seconds: float = Field(900.0, gt=0)
    first_status_check_seconds: float = Field(1.0, ge=0)
    #: how long past EMAIL_TIMEOUT_SECONDS a process that died mid-send keeps its deliveries leased
    lease_margin_seconds: float = Field(15.0, gt=0)
    #: how often the escalation_deliveries gauge is recounted (a count over the whole table)
    gauge_refresh_seconds: float = Field(10.0, gt=0)


class BrandSettings(Section):
    name: str = "BankX"
    logo_url: str = "https://bankx.com/static/logo.png"
    primary_color: str = "#0b3d91"
    accent_color: str = "#f5a623"
    text_color: str = "#1f2933"
    background_color: str = "#f4f6fa"
    font_family: str = "Helvetica, Arial, sans-serif"

    @field_validator("primary_color", "accent_color", "text_color", "background_color")
    @classmethod
    def _colour(cls, value: str) -> str:
        if not re.fullmatch(r"#[0-9a-fA-F]{3}([0-9a-fA-F]{3})?", value):
            raise ValueError("use a hex colour such as #0b3d91")
        return value

    @field_validator("logo_url")
    @classmethod
    def _https(cls, value: str) -> str:
        return _check_url(value)


def _check_url(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError("must be an http:// or https:// URL")
    return value


class LinkSettings(Section):
    """URL templates; `{ticket_id}` and friends are filled in URL-encoded."""

    tracking_url: str = "https://bankx.com/support/tickets/{ticket_id}"
    dashboard_url: str = "https://bankx.com/admin/tickets/{ticket_id}"

    @field_validator("tracking_url", "dashboard_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value)


class ValidationSettings(Section):
    ticket_id_pattern: str = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    customer_id_pattern: str = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    query_max_chars: int = Field(4000, ge=1)
    reason_max_chars: int = Field(500, ge=1)

    @field_validator("ticket_id_pattern", "customer_id_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        return value


class TemplateSet(Section):
    """Template files, relative to the directory of the config file."""

    subject: str
    text: str
    html: str


CUSTOMER_TEMPLATES = TemplateSet(
    subject="templates/customer/subject.txt.j2",
    text="templates/customer/body.txt.j2",
    html="templates/customer/body.mjml",
)
TEAM_TEMPLATES = TemplateSet(
    subject="templates/bank_team/subject.txt.j2",
    text="templates/bank_team/body.txt.j2",
    html="templates/bank_team/body.mjml",
)


class EmailTemplateSettings(Section):
    templates: TemplateSet
    wording: dict[str, str] = Field(default_factory=dict)


def _customer_default() -> EmailTemplateSettings:
    return EmailTemplateSettings(templates=CUSTOMER_TEMPLATES)


def _team_default() -> EmailTemplateSettings:
    return EmailTemplateSettings(templates=TEAM_TEMPLATES)


class UseCaseSettings(Section):
    title: str
    priority: Literal["low", "normal", "high", "urgent"] = "normal"
    customer: EmailTemplateSettings = Field(default_factory=_customer_default)
    bank_team: EmailTemplateSettings = Field(default_factory=_team_default)

    @model_validator(mode="before")
    @classmethod
    def _default_templates(cls, data: Any) -> Any:
        # A use case that names only wording reuses the standard templates.
        if isinstance(data, dict):
            for role, default in (("customer", CUSTOMER_TEMPLATES), ("bank_team", TEAM_TEMPLATES)):
                block = data.get(role)
                if isinstance(block, dict) and "templates" not in block:
                    data = {**data, role: {**block, "templates": default.model_dump()}}
        return data


class Settings(Section):
    profile: Literal["dev", "prod"] = "dev"
    server: ServerSettings = Field(default_factory=ServerSettings)
    email: EmailSettings = Field(default_factory=EmailSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    brand: BrandSettings = Field(default_factory=BrandSettings)
    links: LinkSettings = Field(default_factory=LinkSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    use_cases: dict[str, UseCaseSettings] = Field(default_factory=dict, validate_default=True)
    #: raw per-transport blocks; each transport's settings model validates its own
    transports: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: directory the config file lives in; template paths resolve against it
    base_dir: Path = Field(default_factory=Path.cwd)

    @field_validator("use_cases")
    @classmethod
    def _names(cls, value: dict[str, UseCaseSettings]) -> dict[str, UseCaseSettings]:
        for name in value:
            if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,15}", name):
                raise ValueError(f"use case name {name!r}: use upper-case letters, digits and _ (like UC2)")
        if not value:
            raise ValueError("configure at least one use case")
        return value

    @model_validator(mode="after")
    def _retention_outlasts_retries(self) -> Settings:
        days = self.store.retention_days
        if days is not None and days * 24 <= self.email.retry_horizon_hours:
            raise ValueError(
                f"store.retention_days ({days}) must be longer than email.retry_horizon_hours "
                f"({self.email.retry_horizon_hours:g} h): deliveries still being retried are never scrubbed"
            )
        return self

    @property
    def transport_chain(self) -> list[str]:
        """The failover chain; `file` in dev and `acs` in prod unless EMAIL_TRANSPORT says."""
        if self.email.transport:
            return self.email.transport
        return ["acs"] if self.profile == "prod" else ["file"]

    @property
    def json_logs(self) -> bool:
        if self.logging.json_lines is not None:
            return self.logging.json_lines
        return self.profile == "prod"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.email.timezone)

    def resolve(self, relative: str | Path) -> Path:
        """A path from the config file, made absolute against the config's directory."""
        path = Path(relative)
        return path if path.is_absolute() else self.base_dir / path


def find_config(explicit: str | Path | None, env: Mapping[str, str]) -> Path | None:
    """`--config`, else ESCALATION_CONFIG, else ./config.yaml when it exists."""
    named = explicit or env.get("ESCALATION_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    default = Path.cwd() / DEFAULT_CONFIG_NAME
    return default if default.is_file() else None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def apply_environment(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Write the contract's environment variables into `data`; return key path -> variable."""
    origin: dict[str, str] = {}
    for variable, path in ENV_OVERRIDES.items():
        raw = env.get(variable)
        if raw is None or raw == "":
            continue
        value: Any = raw
        if variable in LIST_VARIABLES:
            value = [part.strip() for part in raw.split(",") if part.strip()]
        node = data
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[path[-1]] = value
        origin[".".join(path)] = variable
    return origin


def describe_validation_error(err: ValidationError, origin: Mapping[str, str], source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for problem in err.errors():
        path = ".".join(str(part) for part in problem["loc"])
        where = next((f" (set by {var})" for key, var in origin.items() if path.startswith(key)), "")
        message = problem["msg"].removeprefix("Value error, ")
        # A rule across sections has no single key; its message names the keys.
        lines.append(f"  {path}{where}: {message}" if path else f"  {message}")
    return "\n".join(lines)


def load_settings(
    config: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the config file, apply the environment and `overrides` (CLI flags), validate."""
    env = os.environ if env is None else env
    path = find_config(config, env)
    data = read_yaml(path) if path else {}
    origin = apply_environment(data, env)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
        origin[dotted] = f"--{last.replace('_', '-')}"
    data["base_dir"] = base_dir = (path.parent if path else Path.cwd()).resolve()
    try:
        settings = Settings.model_validate(data)
    except ValidationError as err:
        message = describe_validation_error(err, origin, str(path or "built-in defaults"))
        if path is None:
            message += (
                f"\n(no {DEFAULT_CONFIG_NAME} in {Path.cwd()}: run from the directory that holds it, "
                "or pass --config PATH / set ESCALATION_CONFIG)"
            )
        raise ConfigError(message) from None
    # Relative paths written in the config file are relative to that file, like templates; those
    # from the environment or a flag are the caller's own (relative to the working directory).
    if "store.database_url" not in origin:
        settings.store.database_url = _anchored(settings.store.database_url, base_dir)
    token_file = settings.server.auth_token_file
    if token_file is not None and "server.auth_token_file" not in origin:
        settings.server.auth_token_file = base_dir / token_file
    return settings


def _anchored(database_url: str, base_dir: Path) -> str:
    url = make_url(database_url)
    relative = url.database not in (None, "", ":memory:") and not Path(url.database).is_absolute()
    if url.drivername in SQLITE_SCHEMES and relative:
        return str(url.set(database=str(base_dir / str(url.database))))
    return database_url
