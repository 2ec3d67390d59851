"""The MCP surface: the `sendemail` and `get_email_status` tools, and the plain HTTP routes."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations
from pydantic import AnyHttpUrl, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from gateway import __version__
from gateway.app import Gateway
from gateway.auth import StaticTokenVerifier
from gateway.errors import InputError
from gateway.models import EscalationResult

log = logging.getLogger("gateway.mcp")

INSTRUCTIONS = """\
EscalationComms sends support-ticket escalation emails for BankX.
Call `sendemail` once a ticket exists and the customer's question must go to a human:
it emails the customer a confirmation and the bank's support team a notice.
Repeating a call with the same arguments is safe: nothing is sent twice.
Use `get_email_status` with the returned email_id to see whether the emails were delivered.
"""

SENDEMAIL_DESCRIPTION = """\
Escalate a customer's question to the bank's human support team by email.

Sends two emails: a confirmation to the customer (ticket ID and tracking link) and an internal
notice to the support team (query, reason, action items, dashboard link). Call it once per ticket,
after the ticket exists. Repeating the identical call is safe: it sends nothing again and returns
the first result with replay=true; the same ticket_id with different content is refused.

The result's status: "sent" (both emails handed to the mail service), "queued" (will be retried
automatically; check later with get_email_status), "partial" (one email failed) or "failed".
Input problems are returned as errors that name the field to fix.
"""

STATUS_DESCRIPTION = """\
Look up the current delivery state of an escalation by the email_id that sendemail returned.
Each email moves from queued to sent, then to delivered (where the mail service confirms
delivery) or failed with the reason."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def build_verifier(gateway: Gateway) -> StaticTokenVerifier:
    server = gateway.settings.server
    return StaticTokenVerifier([t.get_secret_value() for t in server.auth_tokens], server.auth_token_file)


def build_server(gateway: Gateway, verifier: StaticTokenVerifier | None = None) -> MCPServer:
    """The MCP server object; its lifespan runs the gateway (store, transports, dispatcher)."""
    settings = gateway.settings

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[Gateway]:
        async with gateway.running():
            yield gateway

    auth = None
    if verifier is not None and verifier.enabled:
        base = AnyHttpUrl(f"http://{settings.server.host}:{settings.server.port}")
        auth = AuthSettings(issuer_url=base, resource_server_url=None)
    else:
        verifier = None
    mcp = MCPServer(
        name="escalation-comms",
        title="EscalationComms",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
        token_verifier=verifier,
        auth=auth,
        log_level=settings.logging.level,
    )

    @mcp.tool(
        name="sendemail",
        title="Escalate to human support by email",
        description=SENDEMAIL_DESCRIPTION,
        annotations=ToolAnnotations(
            title="Escalate to human support by email",
            read_only_hint=False,
            destructive_hint=False,
            idempotent_hint=True,
            open_world_hint=True,
        ),
    )
    async def sendemail(
        ticket_id: Annotated[str, Field(description="Support ticket ID, e.g. TKT-2025-001234")],
        customer_id: Annotated[str, Field(description="Customer identifier, e.g. CUST-001")],
        customer_email: Annotated[str, Field(description="Customer's email address")],
        query: Annotated[str, Field(description="The customer's original question, as they asked it")],
        use_case: Annotated[
            str,
            Field(
                description="The escalating use case, e.g. UC2 (product FAQ) or UC3 "
                "(money coach); a configured use case"
            ),
        ],
        reason: Annotated[str, Field(description="Why a human is needed, e.g. 'Out of scope - ...'")],
    ) -> EscalationResult:
        try:
            return await gateway.service.sendemail(
                ticket_id=ticket_id,
                customer_id=customer_id,
                customer_email=customer_email,
                query=query,
                use_case=use_case,
                reason=reason,
            )
        except InputError as err:
            raise ToolError(str(err)) from None

    @mcp.tool(
        name="get_email_status",
        title="Delivery status of an escalation",
        description=STATUS_DESCRIPTION,
        annotations=ToolAnnotations(
            title="Delivery status of an escalation",
            read_only_hint=True,
            destructive_hint=False,
            idempotent_hint=True,
            open_world_hint=False,
        ),
    )
    async def get_email_status(
        email_id: Annotated[
            str, Field(description="The email_id from sendemail, e.g. EMAIL-UC2-20251107-001")
        ],
    ) -> EscalationResult:
        try:
            return await gateway.service.status(email_id)
        except InputError as err:
            raise ToolError(str(err)) from None

    _add_routes(mcp, gateway, verifier)
    return mcp


def _add_routes(mcp: MCPServer, gateway: Gateway, verifier: StaticTokenVerifier | None) -> None:
    protect_metrics = verifier is not None and gateway.settings.server.metrics_require_auth

    @mcp.custom_route("/healthz", methods=["GET"], include_in_schema=False)
    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @mcp.custom_route("/readyz", methods=["GET"], include_in_schema=False)
    async def readyz(_request: Request) -> Response:
        ready, checks = await gateway.readiness()
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
        )

    @mcp.custom_route("/metrics", methods=["GET"], include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if protect_metrics and verifier is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not verifier.matches(token.strip()):
                return PlainTextResponse(
                    "bearer token required", status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
        body, content_type = gateway.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)


def transport_security(
    gateway: Gateway, verifier: StaticTokenVerifier | None
) -> TransportSecuritySettings | None:
    """Host/Origin checks: the configured lists, else the SDK's loopback lists on a loopback bind.

    A non-loopback bind without `server.allowed_hosts` is served without Host/Origin checks:
    DNS rebinding cannot supply the bearer token, so the token is the protection there.
    """
    server = gateway.settings.server
    if server.allowed_hosts:
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=server.allowed_hosts,
            allowed_origins=server.allowed_origins,
        )
    if is_loopback(server.host):
        # The SDK turns protection on by itself only for 127.0.0.1, localhost and ::1 spelt
        # exactly so; any other loopback bind (127.0.0.2, [::1]) would go unchecked.
        bound = server.host.strip("[]")
        bound = f"[{bound}]" if ":" in bound else bound
        names = list(dict.fromkeys(["127.0.0.1", "localhost", "[::1]", bound]))
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[f"{name}:*" for name in names],
            allowed_origins=[f"http://{name}:*" for name in names],
        )
    log.warning(
        "server.allowed_hosts is empty for a %s bind: Host and Origin are not checked (%s); "
        "list the names clients use to reach this server",
        server.host,
        "the bearer token still is" if verifier is not None else "and no bearer token is required either",
    )
    return TransportSecuritySettings(enable_dns_rebinding_protection=False)


def build_http_app(gateway: Gateway) -> Starlette:
    """The ASGI app for `serve`: /mcp plus /healthz, /readyz and /metrics."""
    verifier = build_verifier(gateway)
    mcp = build_server(gateway, verifier)
    server = gateway.settings.server
    return mcp.streamable_http_app(
        stateless_http=server.stateless_http,
        json_response=server.json_response,
        transport_security=transport_security(gateway, verifier if verifier.enabled else None),
        host=server.host,
    )
