"""A minimal SMTP sink process: aiosmtpd accepting every message and counting it.

Run as `python -m bench.sink PORT`. It is its own process so its event loop does
not share a CPU slice with the benchmark driver. On SIGTERM it prints the number
of messages it accepted (one line, `accepted N`) and exits.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class Counter:
    """aiosmtpd handler: take the message, count it, drop it."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.accepted += 1
        return "250 2.0.0 OK"


async def serve(port: int) -> int:
    handler = Counter()
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        # A fixed hostname: aiosmtpd would otherwise call socket.getfqdn() for every connection.
        return SMTP(handler, hostname="bench-sink", enable_SMTPUTF8=True, loop=loop)

    server = await loop.create_server(factory, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    return handler.accepted


def main() -> None:
    accepted = asyncio.run(serve(int(sys.argv[1])))
    print(f"accepted {accepted}", flush=True)


if __name__ == "__main__":
    main()
