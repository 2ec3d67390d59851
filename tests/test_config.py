"""Settings: config.yaml plus the contract's environment variables, validated once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError
from tests.support import ROOT, clean_env


def test_repository_config_loads_with_the_contract_defaults() -> None:
    settings = load_settings(ROOT / "config.yaml", env=clean_env())
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8078)
    assert settings.transport_chain == ["file"]
    assert settings.store.database_url == f"sqlite:///{ROOT / 'var' / 'gateway.db'}"
    assert settings.email.sender == "noreply@bankx.com"
    assert settings.email.support_team == "support@bankx.com"
    assert (settings.email.retry_count, settings.email.timeout_seconds) == (3, 30)
    assert settings.email.timezone == "Asia/Bangkok"
    assert list(settings.use_cases) == ["UC2", "UC3"]
    assert settings.json_logs is False


def test_environment_overrides_the_file(settings_factory: Callable[..., Settings]) -> None:
    settings = settings_factory(
        env={
            "PROFILE": "prod",
            "HOST": "0.0.0.0",
            "PORT": "9000",
            "EMAIL_TRANSPORT": "acs, smtp",
            "SENDER_EMAIL": "alerts@bank.example",
            "SUPPORT_TEAM_EMAIL": "team@bank.example",
            "DATABASE_URL": "postgresql://gw@db/gateway",
            "EMAIL_RETRY_COUNT": "5",
            "EMAIL_TIMEOUT_SECONDS": "12.5",
            "LOG_LEVEL": "debug",
            "MCP_AUTH_TOKEN": "one, two",
        }
    )
    assert settings.profile == "prod" and settings.json_logs
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 9000)
    assert settings.transport_chain == ["acs", "smtp"]
    assert (settings.email.sender, settings.email.support_team) == (
        "alerts@bank.example",
        "team@bank.example",
    )
    assert settings.store.database_url == "postgresql://gw@db/gateway"
    assert (settings.email.retry_count, settings.email.timeout_seconds) == (5, 12.5)
    assert settings.logging.level == "DEBUG"
    assert [t.get_secret_value() for t in settings.server.auth_tokens] == ["one", "two"]


def test_prod_profile_defaults_to_acs(settings_factory: Callable[..., Settings]) -> None:
    assert settings_factory(env={"PROFILE": "prod"}).transport_chain == ["acs"]


def test_unknown_key_stops_startup_with_its_path(config_factory: Callable[..., Path]) -> None:
    path = config_factory({"email": {"retry_cuont": 4}})
    with pytest.raises(ConfigError, match=r"email\.retry_cuont: Extra inputs are not permitted"):
        load_settings(path, env=clean_env())


def test_bad_value_from_the_environment_names_the_key_and_the_variable(
    config_factory: Callable[..., Path],
) -> None:
    with pytest.raises(ConfigError, match=r"server\.port \(set by PORT\): Input should be a valid integer"):
        load_settings(config_factory(), env=clean_env({"PORT": "eighty"}))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"email": {"sender": "not an address"}}, r"email\.sender: not a valid email address"),
        ({"email": {"timezone": "Mars/Olympus"}}, r"email\.timezone: unknown time zone"),
        ({"brand": {"primary_color": "blue"}}, r"brand\.primary_color: use a hex colour"),
        ({"links": {"tracking_url": "javascript:alert(1)"}}, r"links\.tracking_url: must be an http"),
        ({"validation": {"ticket_id_pattern": "(["}}, r"validation\.ticket_id_pattern: not a valid regular"),
        ({"use_cases": {"uc4": {"title": "x"}}}, r"use case name 'uc4'"),
        ({"use_cases": {"UC4": {"priority": "asap", "title": "x"}}}, r"use_cases\.UC4\.priority"),
        ({"store": {"database_url": "mysql://x"}}, r"store\.database_url: unsupported database .mysql."),
        ({"email": {"retry_count": 0}}, r"email\.retry_count"),
    ],
)
def test_bad_values_are_refused_with_their_path(
    config_factory: Callable[..., Path], patch: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(config_factory(patch), env=clean_env())


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: not valid YAML"):
        load_settings(path, env=clean_env())


def test_config_named_by_ESCALATION_CONFIG(config_factory: Callable[..., Path]) -> None:
    path = config_factory({"server": {"port": 9123}})
    assert load_settings(None, env=clean_env({"ESCALATION_CONFIG": str(path)})).server.port == 9123


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", env=clean_env())


def test_template_paths_resolve_against_the_config_directory(config_factory: Callable[..., Path]) -> None:
    path = config_factory()
    settings = load_settings(path, env=clean_env())
    assert settings.base_dir == path.parent.resolve()
    assert settings.resolve("templates/customer/body.mjml").is_file()


def test_relative_sqlite_path_in_the_config_file_is_relative_to_that_file(
    config_factory: Callable[..., Path],
) -> None:
    path = config_factory({"store": {"database_url": "sqlite:///state/escalations.db"}})
    from_file = load_settings(path, env=clean_env())
    assert from_file.store.database_url == f"sqlite:///{path.parent.resolve() / 'state' / 'escalations.db'}"
    from_env = load_settings(path, env=clean_env({"DATABASE_URL": "sqlite:///here.db"}))
    assert from_env.store.database_url == "sqlite:///here.db"  # the environment's is the caller's own


def test_relative_token_file_and_sink_directory_in_the_config_file_are_relative_to_that_file(
    config_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_factory(
        {"server": {"auth_token_file": "secrets/tokens"}, "transports": {"file": {"dir": "mail"}}}
    )
    monkeypatch.chdir(tmp_path)  # not the config file's directory
    settings = load_settings(path, env=clean_env({"EMAIL_TRANSPORT": "file"}))
    site = path.parent.resolve()
    assert settings.server.auth_token_file == site / "secrets" / "tokens"
    assert Gateway(settings).transports["file"].directory == site / "mail"
    # FILE_SINK_DIR is the caller's own: relative to the working directory, as given.
    monkeypatch.setenv("FILE_SINK_DIR", "elsewhere")
    assert Gateway(settings).transports["file"].directory == Path("elsewhere")


def test_no_config_file_and_no_use_cases_stops_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"use_cases: configure at least one use case(.|\n)*--config"):
        load_settings(None, env=clean_env())


@pytest.mark.parametrize("url", ["postgresql+psycopg://db/x", "postgresql://u@h:port/db", "nonsense"])
def test_a_database_url_the_store_cannot_open_is_refused_at_check(
    config_factory: Callable[..., Path], url: str
) -> None:
    with pytest.raises(ConfigError, match=r"store\.database_url \(set by DATABASE_URL\)"):
        load_settings(config_factory(), env=clean_env({"DATABASE_URL": url}))
