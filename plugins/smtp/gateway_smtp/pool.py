"""A small pool of persistent SMTP connections shared by concurrent sends.

At most `size` connections exist at any time: a send first takes one of `size`
slots, then the most recently used idle connection (or none, and opens one).
Connections that idled too long or sent their quota are closed rather than
reused; the caller discards one whose state it cannot trust (`Lease.discard`).
Opening a connection is the caller's business (`Lease.attach`), so the pool does
no I/O except a polite QUIT to connections it retires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiosmtplib import SMTP

log = logging.getLogger("gateway_smtp")


class PoolClosed(RuntimeError):
    """A send or check after `aclose()` (shutdown)."""


@dataclass
class Connection:
    """One open SMTP session and what the pool needs to know to reuse it."""

    client: SMTP
    opened: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    messages: int = 0

    @property
    def is_open(self) -> bool:
        return self.client.is_connected

    def close(self) -> None:
        self.client.close()


class Lease:
    """A slot in the pool, with the connection it holds (if any) for one send or check."""

    def __init__(self, connection: Connection | None) -> None:
        self.connection = connection
        #: True while the connection came from the pool and has not proved itself in this lease
        self.reused = connection is not None

    def attach(self, client: SMTP) -> Connection:
        self.connection = Connection(client)
        self.reused = False
        return self.connection

    def discard(self) -> None:
        """Close the held connection: it is dead, desynchronized, or its state is unknown."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        self.reused = False

    def used(self) -> None:
        """Record one successful exchange on the held connection."""
        if self.connection is not None:
            self.connection.last_used = time.monotonic()
            self.reused = False


class ConnectionPool:
    def __init__(self, size: int, idle_timeout: float, max_messages: int = 0) -> None:
        self.size = size
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        # Free slots as tokens in a queue, not a semaphore: with dozens of sends waiting,
        # asyncio.Semaphore (Python 3.11) scans its waiters on every wake-up (bench/).
        self._slots: asyncio.Queue[None] = asyncio.Queue()
        for _ in range(size):
            self._slots.put_nowait(None)
        self._waiting = 0  # sends queued for a slot (a freed token waits for the first of them)
        self._idle: list[Connection] = []
        self._closed = False

    @property
    def saturated(self) -> bool:
        """Every slot is taken right now."""
        return self._slots.empty() or self._waiting > 0

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Lease]:
        """Hold one slot (waiting for it) and the best idle connection, if any, for a block."""
        if self._closed:
            raise PoolClosed("the SMTP transport is shut down")
        self._waiting += 1
        try:
            await self._slots.get()
        finally:
            self._waiting -= 1
        lease = Lease(self._take_idle())
        try:
            yield lease
        finally:
            try:
                await self._give_back(lease)
            finally:
                self._slots.put_nowait(None)

    def _take_idle(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()  # most recently used first: the likeliest to be alive
            if connection.is_open and now - connection.last_used < self.idle_timeout:
                return connection
            connection.close()
        return None

    async def _give_back(self, lease: Lease) -> None:
        connection = lease.connection
        lease.connection = None
        if connection is None:
            return
        spent = bool(self.max_messages) and connection.messages >= self.max_messages
        if spent and connection.is_open and not self._closed:
            # QUIT while still holding the slot: its replacement must not open before it closed.
            log.debug("SMTP connection sent its %d messages; closing it", connection.messages)
            await _quit(connection)
        elif self._closed or spent or not connection.is_open:
            connection.close()
        else:
            self._idle.append(connection)

    async def aclose(self, quit_wait: float = 1.0) -> None:
        """Stop lending; QUIT and close idle connections. Those in use close when given back."""
        self._closed = True
        idle, self._idle = self._idle, []
        pending = [_quit(c, quit_wait) for c in idle]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def _quit(connection: Connection, quit_wait: float = 1.0) -> None:
    try:
        if connection.is_open:
            await connection.client.quit(timeout=quit_wait)
    except Exception as err:  # a server that is already gone needs no goodbye
        log.debug("QUIT failed (%s); closing anyway", type(err).__name__)
    finally:
        connection.close()
