"""The acs transport's settings and start-up checks: a bad connection string never gets to send."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from gateway_acs import AcsSettings, AcsTransport
from gateway_acs.connection_string import PREFIX, parse_connection_string

from gateway.errors import ConfigError
from gateway.plugins import build_transports, transport_classes
from tests.support import CONTRACT_VARIABLES

KEY = base64.b64encode(b"k" * 64).decode()
GOOD = f"endpoint=https://bankx.communication.azure.com/;accesskey={KEY}"


@pytest.fixture(autouse=True)
def no_acs_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's shell must not decide these tests."""
    for name in (*CONTRACT_VARIABLES, "ACS_ENDPOINT", "ACS_REQUEST_TIMEOUT_SECONDS", "ACS_API_VERSION"):
        monkeypatch.delenv(name, raising=False)


def test_acs_is_registered_through_its_entry_point() -> None:
    assert transport_classes()["acs"] is AcsTransport
    assert AcsTransport.tracks_delivery is True


def test_connection_string_parts_are_normalised() -> None:
    parsed = parse_connection_string(f"  Endpoint=https://BankX.communication.azure.com/ ;AccessKey={KEY};  ")
    assert parsed.endpoint == "https://bankx.communication.azure.com"
    assert parsed.access_key.get_secret_value() == KEY


def test_connection_string_keeps_a_port() -> None:
    assert parse_connection_string(f"endpoint=https://127.0.0.1:8443/;accesskey={KEY}").endpoint == (
        "https://127.0.0.1:8443"
    )


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("", "it is empty"),
        (f"accesskey={KEY}", "endpoint= missing"),
        ("endpoint=https://bankx.communication.azure.com/", "accesskey= missing"),
        (
            f"endpoint=https://bankx.communication.azure.com/;accesskey={KEY};oops",
            "part 3 is not of the form",
        ),
        (
            f"endpoint=https://a.example/;endpoint=https://b.example/;accesskey={KEY}",
            "endpoint= appears twice",
        ),
        (f"endpoint=http://bankx.communication.azure.com/;accesskey={KEY}", "must be an https:// URL"),
        (f"endpoint=bankx.communication.azure.com;accesskey={KEY}", "must be an https:// URL"),
        (f"endpoint=https://bankx.communication.azure.com/emails;accesskey={KEY}", "without a path"),
        (f"endpoint=https://user:pw@bankx.communication.azure.com/;accesskey={KEY}", "user name or password"),
        (f"endpoint=https://;accesskey={KEY}", "no host name"),
        (f"endpoint=https://bankx.communication.azure.com:99999/;accesskey={KEY}", "not a valid URL"),
        ("endpoint=https://bankx.communication.azure.com/;accesskey=not-base64!!", "not valid base64"),
        ("endpoint=https://bankx.communication.azure.com/;accesskey=abc", "not valid base64"),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else None,
)
def test_bad_connection_string_says_what_is_wrong_without_the_key(raw: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_connection_string(raw)
    message = str(caught.value)
    assert message.startswith(PREFIX)
    assert says in message
    assert "AZURE_COMMUNICATION_CONNECTION_STRING" in message
    for secret in (KEY, "not-base64!!", "accesskey=abc", "pw@"):
        assert secret not in message


def test_swapped_parts_never_echo_the_key_as_an_endpoint() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_connection_string(f"endpoint={KEY};accesskey=https://bankx.communication.azure.com/")
    assert KEY not in str(caught.value)


def test_constructing_the_transport_validates_the_connection_string() -> None:
    with pytest.raises(ConfigError, match=f"^{PREFIX}"):
        AcsTransport(AcsSettings(connection_string="endpoint=https://x.example/;accesskey=%%%"))


def test_missing_connection_string_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="AZURE_COMMUNICATION_CONNECTION_STRING is not set"):
        AcsTransport(AcsSettings())


def test_core_start_up_stops_on_a_bad_connection_string_only_when_acs_is_in_the_chain() -> None:
    blocks = {"acs": {"connection_string": "endpoint=http://x.example/;accesskey=abc"}}
    assert set(build_transports(["file"], blocks)) == {"file"}
    with pytest.raises(ConfigError, match=f"^{PREFIX}"):
        build_transports(["acs"], blocks)


def test_environment_wins_over_the_config_block(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AZURE_COMMUNICATION_CONNECTION_STRING", GOOD)
    monkeypatch.setenv("ACS_CA_BUNDLE", str(tmp_path / "env.pem"))
    monkeypatch.setenv("ACS_REQUEST_TIMEOUT_SECONDS", "4")
    settings = AcsSettings(
        connection_string="endpoint=https://config.example/;accesskey=abc",
        ca_bundle=tmp_path / "config.pem",
        request_timeout_seconds=20,
    )
    assert settings.connection_string is not None
    assert settings.connection_string.get_secret_value() == GOOD
    assert settings.ca_bundle == tmp_path / "env.pem"
    assert settings.request_timeout_seconds == 4


def test_unrelated_variables_with_the_field_names_are_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ENDPOINT", "CONNECTION_STRING", "CA_BUNDLE", "API_VERSION", "REQUEST_TIMEOUT_SECONDS"):
        monkeypatch.setenv(name, "from-some-other-program")
    settings = AcsSettings()
    assert settings.endpoint is None and settings.connection_string is None and settings.ca_bundle is None
    assert settings.api_version == "2025-09-01" and settings.request_timeout_seconds == 10


def test_rate_limits_in_the_acs_block_are_for_the_core_not_the_transport() -> None:
    block = {"connection_string": GOOD, "rate_limits": ["30/minute", "100/hour"]}
    assert isinstance(build_transports(["acs"], {"acs": block})["acs"], AcsTransport)


def test_unknown_key_in_the_config_block_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"transports\.acs\.sender_adress"):
        build_transports(["acs"], {"acs": {"connection_string": GOOD, "sender_adress": "x@bankx.com"}})


def test_settings_never_show_the_connection_string() -> None:
    settings = AcsSettings(connection_string=GOOD)
    assert KEY not in repr(settings) and KEY not in str(settings)


def test_connection_string_and_endpoint_together_are_ambiguous() -> None:
    with pytest.raises(ConfigError, match="not both"):
        AcsTransport(AcsSettings(connection_string=GOOD, endpoint="https://bankx.communication.azure.com"))


def test_managed_identity_endpoint_must_be_https() -> None:
    with pytest.raises(ConfigError, match=r"ACS_ENDPOINT.*https://"):
        AcsTransport(AcsSettings(endpoint="http://bankx.communication.azure.com"))


def test_ca_bundle_that_does_not_exist_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"ACS_CA_BUNDLE.*is not a file"):
        AcsTransport(AcsSettings(connection_string=GOOD, ca_bundle=tmp_path / "missing.pem"))


def test_ca_bundle_that_is_not_pem_stops_start_up(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"ACS_CA_BUNDLE.*not a readable PEM"):
        AcsTransport(AcsSettings(connection_string=GOOD, ca_bundle=junk))
