"""Only callers holding a bearer token send as the bank: /mcp auth, token rotation, the bind guard.

Every test talks to a real `escalation-comms serve` process over HTTP, with the
real MCP client where a tool call is made.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from gateway.auth import StaticTokenVerifier, token_digest
from tests.support import (
    INITIALIZE,
    MCP_HEADERS,
    SAMPLE_CALL,
    GatewayProcess,
    clean_env,
    free_port,
    wait_for,
    write_config,
)

TOKEN_A = "tok-alpha-" + "a1" * 16
TOKEN_B = "tok-bravo-" + "b2" * 16
WRONG = "tok-wrong-" + "c3" * 16


def post_mcp(gateway: GatewayProcess, headers: dict[str, str] | None = None) -> httpx2.Response:
    """A raw JSON-RPC initialize POST to /mcp, to see the HTTP status the server answers."""
    return httpx2.post(
        gateway.mcp_url, json=INITIALIZE, headers={**MCP_HEADERS, **(headers or {})}, timeout=10
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def mcp_client(url: str, token: str | None) -> AsyncIterator[Client]:
    """The SDK's client over streamable HTTP, sending the bearer token on every request."""
    async with (
        httpx2.AsyncClient(headers=bearer(token) if token else {}, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


async def escalate(url: str, token: str | None) -> dict[str, object]:
    async with mcp_client(url, token) as client:
        result = await client.call_tool(
            "sendemail", {**SAMPLE_CALL, "ticket_id": f"TKT-{uuid.uuid4().hex[:12]}"}
        )
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


@pytest.fixture(scope="module")
def token_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Two tokens in MCP_AUTH_TOKEN (with stray spaces), DEBUG logging, /metrics left open."""
    config = write_config(tmp_path_factory.mktemp("auth"))
    env = {"MCP_AUTH_TOKEN": f" {TOKEN_A} , {TOKEN_B} ", "LOG_LEVEL": "DEBUG"}
    with GatewayProcess(config, env=env) as gateway:
        yield gateway


# -- /mcp --------------------------------------------------------------------------------------------


def test_mcp_without_a_token_is_refused_with_401(token_gateway: GatewayProcess) -> None:
    response = post_mcp(token_gateway)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {WRONG}",
        "Bearer",
        f"Bearer {TOKEN_A[:-1]}",  # a prefix of a real token
        f"Bearer {TOKEN_A}x",  # a real token with a suffix
        f"Bearer {TOKEN_A},{TOKEN_B}",  # the whole variable
        f"Basic {TOKEN_A}",  # the right secret in the wrong scheme
        f"Bearer {token_digest(TOKEN_A)}",  # its digest is not the token
    ],
    ids=["wrong", "scheme-only", "prefix", "suffix", "both-joined", "basic-scheme", "digest"],
)
def test_mcp_with_a_wrong_token_is_refused_with_401(
    token_gateway: GatewayProcess, authorization: str
) -> None:
    response = post_mcp(token_gateway, {"Authorization": authorization})
    assert response.status_code == 401
    assert TOKEN_A not in response.text and WRONG not in response.text


def test_mcp_with_the_right_token_answers(token_gateway: GatewayProcess) -> None:
    assert post_mcp(token_gateway, bearer(TOKEN_A)).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("token", [TOKEN_A, TOKEN_B], ids=["first", "second"])
async def test_each_comma_separated_token_can_call_sendemail(
    token_gateway: GatewayProcess, token: str
) -> None:
    result = await escalate(token_gateway.mcp_url, token)
    assert result["status"] == "sent"


@pytest.mark.anyio
async def test_mcp_client_with_a_wrong_token_cannot_even_connect(token_gateway: GatewayProcess) -> None:
    with pytest.raises(BaseExceptionGroup) as caught:  # task groups wrap the SDK's MCPError
        async with mcp_client(token_gateway.mcp_url, WRONG) as client:
            await client.call_tool("sendemail", SAMPLE_CALL)
    assert caught.group_contains(MCPError, depth=None)


def test_healthz_and_metrics_stay_open_by_default(token_gateway: GatewayProcess) -> None:
    assert httpx2.get(f"{token_gateway.url}/healthz").status_code == 200
    metrics = httpx2.get(f"{token_gateway.url}/metrics")
    assert metrics.status_code == 200
    assert "# TYPE" in metrics.text


@pytest.mark.anyio
async def test_tokens_never_reach_the_logs_even_at_debug(token_gateway: GatewayProcess) -> None:
    await escalate(token_gateway.mcp_url, TOKEN_A)
    for authorization in (f"Bearer {WRONG}", f"Bearer {TOKEN_B}x", f"Basic {TOKEN_B}"):
        assert post_mcp(token_gateway, {"Authorization": authorization}).status_code == 401
    logs = token_gateway.logs()
    for secret in (TOKEN_A, TOKEN_B, WRONG, token_digest(TOKEN_A), token_digest(TOKEN_B)):
        assert secret not in logs
        assert secret[10:30] not in logs  # not even a piece of it


# -- /metrics behind the token -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = write_config(tmp_path_factory.mktemp("metrics"), {"server": {"metrics_require_auth": True}})
    with GatewayProcess(config, env={"MCP_AUTH_TOKEN": TOKEN_A}) as gateway:
        yield gateway


def test_metrics_need_the_token_when_configured(metrics_gateway: GatewayProcess) -> None:
    url = f"{metrics_gateway.url}/metrics"
    assert httpx2.get(url).status_code == 401
    assert httpx2.get(url, headers=bearer(WRONG)).status_code == 401
    assert httpx2.get(url, headers={"Authorization": f"Basic {TOKEN_A}"}).status_code == 401
    answer = httpx2.get(url, headers=bearer(TOKEN_A))
    assert answer.status_code == 200 and "# TYPE" in answer.text


def test_healthz_stays_open_when_metrics_are_protected(metrics_gateway: GatewayProcess) -> None:
    assert httpx2.get(f"{metrics_gateway.url}/healthz").status_code == 200


# -- the token file ----------------------------------------------------------------------------------


def write_digests(path: Path, *tokens: str, comment: str = "# rotated by the test") -> None:
    """Replace the file atomically, as a deployment tool would."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text("\n".join([comment, *(token_digest(t) for t in tokens)]) + "\n")
    os.replace(temporary, path)


def refused_within_a_recheck(gateway: GatewayProcess, token: str) -> None:
    """The file is looked at again at most once a second: a rotation shows within that time."""
    wait_for(
        lambda: post_mcp(gateway, bearer(token)).status_code == 401,
        timeout=10,
        message="the rotated-out token to be refused",
    )


@pytest.mark.anyio
async def test_token_file_rotates_without_a_restart(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.sha256"
    write_digests(tokens, TOKEN_A)
    config = write_config(tmp_path / "site", {"server": {"auth_token_file": str(tokens)}})
    with GatewayProcess(config) as gateway:
        assert (await escalate(gateway.mcp_url, TOKEN_A))["status"] == "sent"
        assert post_mcp(gateway, bearer(TOKEN_B)).status_code == 401

        write_digests(tokens, TOKEN_B)  # rotate: new file, same size
        refused_within_a_recheck(gateway, TOKEN_A)
        assert (await escalate(gateway.mcp_url, TOKEN_B))["status"] == "sent"

        # Rewritten in place with a digest of the same length: the content changed, so it counts.
        tokens.write_text(token_digest(WRONG) + "\n")
        refused_within_a_recheck(gateway, TOKEN_B)
        assert post_mcp(gateway, bearer(WRONG)).status_code == 200

        tokens.unlink()  # a missing file fails closed
        refused_within_a_recheck(gateway, WRONG)
        write_digests(tokens, TOKEN_A, TOKEN_B)
        wait_for(
            lambda: post_mcp(gateway, bearer(TOKEN_A)).status_code == 200,
            timeout=10,
            message="the recreated file's token to be accepted",
        )
        assert post_mcp(gateway, bearer(TOKEN_B)).status_code == 200
        logs = gateway.logs()
    assert logs.count("is unreadable") == 1, "a missing file is reported once, not on every request"
    for secret in (TOKEN_A, TOKEN_B, WRONG):
        assert secret not in logs


@pytest.mark.anyio
async def test_token_file_and_environment_tokens_both_work(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.sha256"
    write_digests(tokens, TOKEN_B)
    config = write_config(tmp_path / "site", {"server": {"auth_token_file": str(tokens)}})
    with GatewayProcess(config, env={"MCP_AUTH_TOKEN": TOKEN_A}) as gateway:
        assert post_mcp(gateway, bearer(TOKEN_A)).status_code == 200
        assert post_mcp(gateway, bearer(TOKEN_B)).status_code == 200
        assert post_mcp(gateway, bearer(WRONG)).status_code == 401


@pytest.mark.anyio
async def test_verifier_ignores_lines_that_are_not_digests(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.sha256"
    tokens.write_text(f"{TOKEN_A}\n{token_digest(TOKEN_B).upper()}  # ops key\n\nnot-hex\n")
    verifier = StaticTokenVerifier([], tokens)
    assert await verifier.verify_token(TOKEN_A) is None  # a raw token in the file is not a digest
    accepted = await verifier.verify_token(TOKEN_B)
    assert accepted is not None
    assert TOKEN_B not in accepted.client_id


@pytest.mark.anyio
async def test_verifier_refuses_the_empty_token_even_when_listed() -> None:
    verifier = StaticTokenVerifier(["", TOKEN_A])
    assert await verifier.verify_token("") is None
    assert await verifier.verify_token(TOKEN_A) is not None


# -- the bind guard ----------------------------------------------------------------------------------


def run_serve(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`serve` expected to refuse to start: it must exit quickly on its own."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config),
            "--port",
            str(free_port()),
            *args,
        ],
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
    )


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--host", "0.0.0.0"), {}),
        ((), {"HOST": "0.0.0.0"}),
        (("--host", "::"), {}),
        (("--host", "0.0.0.0"), {"MCP_AUTH_TOKEN": " , "}),  # only separators: no token at all
    ],
    ids=["flag", "HOST-variable", "ipv6-any", "blank-token"],
)
def test_serve_refuses_a_public_bind_without_a_token(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str]
) -> None:
    finished = run_serve(write_config(tmp_path / "site"), *args, env=env)
    assert finished.returncode != 0
    assert "refusing to serve" in finished.stderr
    assert "without authentication" in finished.stderr
    assert "MCP_AUTH_TOKEN" in finished.stderr and "--insecure-no-auth" in finished.stderr


@pytest.mark.anyio
async def test_insecure_no_auth_serves_a_public_bind_without_host_checks(tmp_path: Path) -> None:
    config = write_config(tmp_path / "site")
    with GatewayProcess(config, args=("--host", "0.0.0.0", "--insecure-no-auth")) as gateway:
        assert (await escalate(gateway.mcp_url, None))["status"] == "sent"
        # No allowed_hosts configured: the Host header is not checked (documented, and warned about).
        assert post_mcp(gateway, {"Host": "evil.example"}).status_code == 200
        logs = gateway.logs()
    assert "allowed_hosts is empty" in logs and "no bearer token is required" in logs


def test_configuration_errors_do_not_print_the_token(tmp_path: Path) -> None:
    env = {"MCP_AUTH_TOKEN": TOKEN_A, "EMAIL_RETRY_COUNT": "many"}
    finished = run_serve(write_config(tmp_path / "site"), env=env)
    assert finished.returncode != 0
    assert "EMAIL_RETRY_COUNT" in finished.stderr
    assert TOKEN_A not in finished.stderr + finished.stdout
