"""The floor's MCP server: tools that do the least possible, served exactly as the gateway is.

Run as `python -m bench.noop_server PORT SINK_PORT`. Same SDK, same streamable HTTP
app, same uvicorn settings as `escalation-comms serve`. Both tools take the same six
arguments as `sendemail` and return a ready-made result of the same model, so the MCP
work on both ends (argument validation, result serialization, the client's
output-schema check) is the same and only the gateway's own work is missing:

- `noop` returns at once (the judged floor: the client then sends the two emails);
- `send_two` first sends the two emails (pre-built bytes) on warm aiosmtplib connections
  from a pool as large as the gateway's, so the work sits in the server process as in the
  gateway.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import aiosmtplib
import uvicorn
from mcp.server.mcpserver import MCPServer
from pydantic import Field

from bench.procs import ROOT
from bench.workloads import SENDER, TEAM, sample_emails
from gateway.config import load_settings
from gateway.models import DeliveryView, EscalationResult, Recipients

#: warm connections of `send_two`: the gateway's default SMTP pool size
POOL_SIZE = 4

RESULT = EscalationResult(
    email_id="EMAIL-UC2-20250101-001",
    status="sent",
    sent_at="2025-01-01T09:00:00+07:00",
    ticket_id="TKT-2025-001234",
    use_case="UC2",
    recipients=Recipients(customer="customer@example.com", bank_team="support@bankx.com"),
    replay=False,
    deliveries=[
        DeliveryView(
            role=role,
            address=address,
            status="sent",
            transport="smtp",
            attempts=1,
            message_id=f"<{n:08d}-0000-4000-8000-000000000000@bankx.com>",
            error=None,
        )
        for n, (role, address) in enumerate(
            [("customer", "customer@example.com"), ("bank_team", "support@bankx.com")]
        )
    ],
)


class WarmPool:
    """POOL_SIZE connected aiosmtplib clients, opened at the first send and kept open."""

    def __init__(self, sink_port: int) -> None:
        self.sink_port = sink_port
        self._idle: asyncio.Queue[aiosmtplib.SMTP] | None = None
        self._filling = asyncio.Lock()

    async def _fill(self) -> asyncio.Queue[aiosmtplib.SMTP]:
        idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        for _ in range(POOL_SIZE):
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.sink_port, local_hostname="bench")
            await client.connect()
            idle.put_nowait(client)
        return idle

    async def send(self, recipient: str, payload: bytes) -> None:
        async with self._filling:
            if self._idle is None:
                self._idle = await self._fill()
        client = await self._idle.get()
        try:
            await client.sendmail(SENDER, [recipient], payload)
        finally:
            self._idle.put_nowait(client)


def build(sink_port: int) -> MCPServer:
    mcp = MCPServer(name="noop")
    customer, team = sample_emails(load_settings(ROOT / "config.yaml", env={}))
    pool = WarmPool(sink_port)

    @mcp.tool(name="noop")
    async def noop(
        ticket_id: Annotated[str, Field(description="Support ticket ID")],
        customer_id: Annotated[str, Field(description="Customer identifier")],
        customer_email: Annotated[str, Field(description="Customer's email address")],
        query: Annotated[str, Field(description="The customer's question")],
        use_case: Annotated[str, Field(description="UC2 or UC3")],
        reason: Annotated[str, Field(description="Why a human is needed")],
    ) -> EscalationResult:
        return RESULT

    @mcp.tool(name="send_two")
    async def send_two(
        ticket_id: Annotated[str, Field(description="Support ticket ID")],
        customer_id: Annotated[str, Field(description="Customer identifier")],
        customer_email: Annotated[str, Field(description="Customer's email address")],
        query: Annotated[str, Field(description="The customer's question")],
        use_case: Annotated[str, Field(description="UC2 or UC3")],
        reason: Annotated[str, Field(description="Why a human is needed")],
    ) -> EscalationResult:
        # Concurrently, on two pooled connections, as the gateway sends an escalation's emails.
        await asyncio.gather(pool.send(customer_email, customer.wire), pool.send(TEAM, team.wire))
        return RESULT

    return mcp


def main() -> None:
    port, sink_port = int(sys.argv[1]), int(sys.argv[2])
    app = build(sink_port).streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, server_header=False, lifespan="on"
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
