"""The work each contender does per escalation, and the inputs they share.

- the gateway: one `sendemail` call over MCP (it renders, records and sends two emails);
- the floor: one no-op MCP call with the same arguments and result shape, plus two raw
  aiosmtplib sends of the same two messages on one warm connection;
- Apprise: its `mailto://` plugin sending the same two emails (a new blocking connection
  per email, as Apprise always does), the per-send throttle off;
- the spec's naive design: smtplib, a new connection per email, MIME built per email.
The peers send pre-rendered content: their rendering is not counted (which favours them).
"""

from __future__ import annotations

import itertools
import os
import smtplib
import threading
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any

import aiosmtplib
import apprise
from aiosmtplib.email import flatten_message
from mcp import Client

from gateway.config import Settings
from gateway.renderer import Renderer
from gateway.transport import OutgoingMessage

SENDER = "noreply@bankx.com"
TEAM = "support@bankx.com"


class Tally:
    """Emails each contender handed to the sink, to check against what the sink accepted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.emails = 0

    def add(self, emails: int) -> None:
        with self._lock:
            self.emails += emails


TALLY = Tally()


class Calls:
    """Distinct sendemail arguments: a new ticket and a new customer address every call."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._numbers = itertools.count(1)

    def next(self) -> dict[str, str]:
        n = next(self._numbers)
        return {
            "ticket_id": f"BENCH-{self.tag}-{n:07d}",
            "customer_id": f"CUST-{n:07d}",
            "customer_email": f"customer{n}@example.com",
            "query": "What is the interest rate for mortgage loans?\nAnd can I repay early?",
            "use_case": "UC2" if n % 2 else "UC3",
            "reason": "Out of scope - Mortgages not in knowledge base",
        }


@dataclass(frozen=True)
class Email:
    to: str
    subject: str
    text: str
    html: str
    wire: bytes  # the RFC 5322 bytes the gateway would send


def sample_emails(settings: Settings) -> list[Email]:
    """The two emails of one UC2 escalation, rendered by the gateway's own renderer."""
    renderer = Renderer(settings)
    request = Calls("sample").next()
    emails = []
    for role, to in (("customer", request["customer_email"]), ("bank_team", TEAM)):
        rendered = renderer.render("UC2", role, request, datetime.now(settings.zone))
        message = OutgoingMessage(
            delivery_id=role,
            message_id=f"<{role}-{os.getpid()}@bankx.com>",
            sender=SENDER,
            recipients=(to,),
            subject=rendered.subject,
            text=rendered.text,
            html=rendered.html,
            date=datetime.now(settings.zone),
            headers={"X-Ticket-ID": request["ticket_id"]},
        )
        wire = flatten_message(message.to_mime(), cte_type="7bit")
        emails.append(Email(to, rendered.subject, rendered.text, rendered.html, wire))
    return emails


# -- MCP clients ---------------------------------------------------------------------------------


class McpClients:
    """N connected MCP client sessions (initialize done outside the measurement), spread over `urls`."""

    def __init__(self, urls: list[str], count: int) -> None:
        self.urls = urls
        self.count = count
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> list[Client]:
        # Sessions hold cancel scopes: they must close in the reverse order they opened.
        return [
            await self._stack.enter_async_context(Client(self.urls[i % len(self.urls)]))
            for i in range(self.count)
        ]

    async def __aexit__(self, *exc: Any) -> None:
        await self._stack.aclose()


def gateway_op(client: Client, calls: Calls, *, count_emails: bool = True) -> Any:
    async def op() -> None:
        result = await client.call_tool("sendemail", calls.next())
        if result.is_error:
            raise RuntimeError(f"sendemail failed: {result.content}")
        status = (result.structured_content or {}).get("status")
        if status != "sent":
            raise RuntimeError(f"sendemail status {status}: {result.structured_content}")
        if count_emails:
            TALLY.add(2)

    return op


class FloorClient:
    """One floor client: its MCP session to the no-op server and its own warm SMTP connection."""

    def __init__(self, client: Client, sink_port: int, calls: Calls, emails: list[Email]) -> None:
        self.client = client
        self.smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink_port, local_hostname="bench")
        self.calls = calls
        self.emails = emails

    async def connect(self) -> None:
        await self.smtp.connect()

    async def close(self) -> None:
        await self.smtp.quit()

    async def op(self) -> None:
        call = self.calls.next()
        result = await self.client.call_tool("noop", call)
        if result.is_error:
            raise RuntimeError(f"noop failed: {result.content}")
        customer, team = self.emails
        await self.smtp.sendmail(SENDER, [call["customer_email"]], customer.wire)
        await self.smtp.sendmail(SENDER, [TEAM], team.wire)
        TALLY.add(2)


def server_floor_op(client: Client, calls: Calls) -> Any:
    """The floor with the sends in the server: `send_two` on the floor's MCP server."""

    async def op() -> None:
        result = await client.call_tool("send_two", calls.next())
        if result.is_error:
            raise RuntimeError(f"send_two failed: {result.content}")
        TALLY.add(2)

    return op


# -- blocking peers ------------------------------------------------------------------------------


def apprise_op(sink_port: int, emails: list[Email]) -> Any:
    """One thread's Apprise client: a mailto:// plugin per recipient, throttle off."""
    plugins = []
    for email in emails:
        url = f"mailto://bench-sink:{sink_port}?smtp=127.0.0.1&mode=insecure&from={SENDER}&to={email.to}"
        plugin = apprise.Apprise.instantiate(url)
        if plugin is None:
            raise RuntimeError(f"Apprise did not accept {url}")
        # Apprise waits request_rate_per_sec (5.5 s for mail) between two sends of one plugin
        # instance; no URL parameter or AppriseAsset option turns it off, the attribute does.
        plugin.request_rate_per_sec = 0
        plugins.append((plugin, email))

    def op() -> None:
        for plugin, email in plugins:
            if not plugin.notify(body=email.html, title=email.subject, body_format=apprise.NotifyFormat.HTML):
                raise RuntimeError("Apprise reported a failed send")
            TALLY.add(1)

    return op


def naive_op(sink_port: int, emails: list[Email], calls: Calls) -> Any:
    """The spec's design with SMTP: build each message, a new blocking connection per email."""

    def op() -> None:
        call = calls.next()
        for email in emails:
            message = EmailMessage(policy=SMTP_POLICY)
            message["From"] = SENDER
            message["To"] = call["customer_email"] if email.to != TEAM else TEAM
            message["Subject"] = email.subject
            message["X-Ticket-ID"] = call["ticket_id"]
            message.set_content(email.text)
            message.add_alternative(email.html, subtype="html")
            with smtplib.SMTP("127.0.0.1", sink_port, timeout=30) as smtp:
                smtp.send_message(message)
            TALLY.add(1)

    return op
