"""An OutgoingMessage as the ACS EmailMessage JSON (REST API 2025-09-01, `POST /emails:send`)."""

from __future__ import annotations

from typing import Any

from gateway.transport import OutgoingMessage


def to_acs_message(message: OutgoingMessage) -> dict[str, Any]:
    """senderAddress, recipients.to, content (subject, plainText, html) and custom headers.

    Our Message-ID travels in `headers`: ACS uses it as the internet message ID when it is
    RFC 2822-shaped (`<id@domain>`, as ours are) and otherwise makes its own, so it never
    causes a rejection (we do not set x-ms-acsemail-validate-message-id). X-Ticket-ID and
    the other custom headers go the same way.
    """
    return {
        "senderAddress": message.sender,
        "recipients": {"to": [{"address": address} for address in message.recipients]},
        "content": {"subject": message.subject, "plainText": message.text, "html": message.html},
        "headers": {"Message-ID": message.message_id, **dict(message.headers)},
    }
