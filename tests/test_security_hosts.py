"""Host and Origin checks on /mcp (DNS rebinding, cross-site browsers), against a real server.

What the MCP SDK answers: 421 for a Host it does not accept, 403 for an Origin
it does not accept. Authentication runs first, so with a token configured a
request without it gets 401 whatever its Host; the Host check applies to
authenticated requests. The plain routes (/healthz, /readyz, /metrics) carry
no Host check.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from gateway.app import Gateway
from gateway.config import load_settings
from tests.support import INITIALIZE, MCP_HEADERS, GatewayProcess, clean_env, write_config

TOKEN = "host-test-token-" + "d4" * 16


def post_mcp(gateway: GatewayProcess, **headers: str) -> httpx2.Response:
    sent = {**MCP_HEADERS, **{name.replace("_", "-"): value for name, value in headers.items()}}
    return httpx2.post(gateway.mcp_url, json=INITIALIZE, headers=sent, timeout=10)


# -- loopback: the SDK's lists --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with GatewayProcess(write_config(tmp_path_factory.mktemp("loopback"))) as gateway:
        yield gateway


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8078", "127.0.0.1.evil.example:8078", ""])
def test_loopback_refuses_a_foreign_host_with_421(loopback: GatewayProcess, host: str) -> None:
    assert post_mcp(loopback, Host=host).status_code == 421


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}"])
def test_loopback_accepts_its_own_names(loopback: GatewayProcess, host: str) -> None:
    assert post_mcp(loopback, Host=host.format(port=loopback.port)).status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "https://127.0.0.1.evil.example", "null"])
def test_loopback_refuses_a_foreign_origin_with_403(loopback: GatewayProcess, origin: str) -> None:
    assert post_mcp(loopback, Origin=origin).status_code == 403


def test_loopback_accepts_a_local_origin_and_none(loopback: GatewayProcess) -> None:
    assert post_mcp(loopback, Origin=f"http://localhost:{loopback.port}").status_code == 200
    assert post_mcp(loopback).status_code == 200  # MCP clients outside a browser send no Origin


def test_plain_routes_answer_whatever_the_host(loopback: GatewayProcess) -> None:
    answer = httpx2.get(f"{loopback.url}/healthz", headers={"Host": "evil.example"})
    assert answer.status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_every_loopback_spelling_gets_host_checks(tmp_path: Path, host: str) -> None:
    """The SDK switches protection on only for three exact spellings; the gateway does for all."""
    from gateway.mcp_server import transport_security

    settings = load_settings(write_config(tmp_path, {"server": {"host": host}}), env=clean_env())
    security = transport_security(Gateway(settings), None)
    assert security is not None and security.enable_dns_rebinding_protection
    assert "evil.example:*" not in security.allowed_hosts
    assert "127.0.0.1:*" in security.allowed_hosts
    bound = f"[{host.strip('[]')}]" if ":" in host else host
    assert f"{bound}:*" in security.allowed_hosts


# -- a public bind with configured names ---------------------------------------------------------------


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Bound to 0.0.0.0 (called via 127.0.0.1) with allowed_hosts and allowed_origins configured."""
    patch = {
        "server": {
            "allowed_hosts": ["mail-gw.bank.internal:*", "mail-gw.bank.internal"],
            "allowed_origins": ["https://console.bank.internal"],
        }
    }
    config = write_config(tmp_path_factory.mktemp("listed"), patch)
    with GatewayProcess(config, env={"MCP_AUTH_TOKEN": TOKEN}, args=("--host", "0.0.0.0")) as gateway:
        yield gateway


def test_listed_host_is_accepted(listed: GatewayProcess) -> None:
    auth = f"Bearer {TOKEN}"
    assert (
        post_mcp(listed, Host=f"mail-gw.bank.internal:{listed.port}", Authorization=auth).status_code == 200
    )
    assert post_mcp(listed, Host="mail-gw.bank.internal", Authorization=auth).status_code == 200


@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}", "localhost:{port}", "evil.example", "mail-gw.bank.internal.evil"]
)
def test_unlisted_host_is_refused_with_421(listed: GatewayProcess, host: str) -> None:
    response = post_mcp(listed, Host=host.format(port=listed.port), Authorization=f"Bearer {TOKEN}")
    assert response.status_code == 421


def test_unlisted_origin_is_refused_with_403(listed: GatewayProcess) -> None:
    host = f"mail-gw.bank.internal:{listed.port}"
    auth = f"Bearer {TOKEN}"
    assert post_mcp(listed, Host=host, Authorization=auth, Origin="https://evil.example").status_code == 403
    assert (
        post_mcp(listed, Host=host, Authorization=auth, Origin="http://console.bank.internal").status_code
        == 403
    )
    allowed = post_mcp(listed, Host=host, Authorization=auth, Origin="https://console.bank.internal")
    assert allowed.status_code == 200


def test_authentication_is_checked_before_the_host(listed: GatewayProcess) -> None:
    assert post_mcp(listed, Host="evil.example").status_code == 401
    assert post_mcp(listed, Host=f"mail-gw.bank.internal:{listed.port}").status_code == 401


# -- a public bind without names: the documented fallback ----------------------------------------------


def test_public_bind_without_allowed_hosts_relies_on_the_token(tmp_path: Path) -> None:
    """No allowed_hosts on 0.0.0.0: any Host passes (with a warning), but only with the token."""
    config = write_config(tmp_path / "site")
    with GatewayProcess(config, env={"MCP_AUTH_TOKEN": TOKEN}, args=("--host", "0.0.0.0")) as gateway:
        assert post_mcp(gateway, Host="evil.example").status_code == 401
        assert post_mcp(gateway, Host="evil.example", Authorization=f"Bearer {TOKEN}").status_code == 200
        logs = gateway.logs()
    assert "allowed_hosts is empty" in logs and "the bearer token still is" in logs
