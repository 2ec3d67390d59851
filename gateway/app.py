"""The composition root: one `Gateway` holds settings, renderer, transports, store and dispatcher.

Building a Gateway validates everything that can be checked without I/O
(settings, templates, transport settings); `running()` opens the store, starts
the transports (never waiting for a mail server) and the background dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway import logs
from gateway.config import Settings
from gateway.dispatcher import Dispatcher, parse_rate_limits
from gateway.errors import DeliveryError, GatewayError
from gateway.metrics import Metrics
from gateway.plugins import build_transports
from gateway.renderer import Renderer
from gateway.service import EscalationService
from gateway.store import Store

log = logging.getLogger("gateway.app")

#: how long /readyz waits for a store or transport check
READINESS_TIMEOUT_SECONDS = 3.0


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.renderer = Renderer(settings)
        self.transports = build_transports(settings.transport_chain, settings.transports, settings.base_dir)
        self.metrics.prime(settings.use_cases, settings.transport_chain)
        logs.show_in_full(settings.email.sender, settings.email.support_team)
        self.rate_limits = {
            name: parse_rate_limits(name, block.get("rate_limits"))
            for name, block in settings.transports.items()
        }
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._store: Store | None = None
        self._service: EscalationService | None = None
        self._dispatcher: Dispatcher | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the gateway is not running")
        return self._store

    @property
    def service(self) -> EscalationService:
        if self._service is None:
            raise RuntimeError("the gateway is not running")
        return self._service

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            raise RuntimeError("the gateway is not running")
        return self._dispatcher

    @asynccontextmanager
    async def running(self, *, background: bool = True) -> AsyncIterator[Gateway]:
        """Open the store and transports; with `background`, run the dispatcher loop too."""
        self._store = await Store.open(self.settings.store.database_url)
        started = []
        try:
            for transport in self.transports.values():
                try:
                    await transport.start()
                except DeliveryError as err:
                    # Start-up never waits for (or fails on) a mail service: /readyz reports it and
                    # deliveries queue until it works.
                    log.error("transport %s is not usable yet: %s", transport.name, err)
                started.append(transport)
            self._dispatcher = Dispatcher(
                self.settings, self._store, self.transports, self.metrics, self.owner, self.rate_limits
            )
            self._service = EscalationService(
                self.settings, self.renderer, self._store, self._dispatcher, self.metrics
            )
            if background:
                self._dispatcher.start()
            log.info(
                "gateway ready: transports %s, store %s",
                ",".join(self.settings.transport_chain),
                self._store.dialect,
            )
            yield self
        finally:
            if self._dispatcher is not None:
                await self._dispatcher.stop(self.settings.server.shutdown_grace_seconds)
            for transport in started:
                try:
                    await transport.aclose()
                except Exception:
                    log.exception("closing transport %s failed", transport.name)
            await self._store.close()
            self._store = self._service = self._dispatcher = None

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the store and every transport of the chain are usable, and what is wrong if not."""
        checks: dict[str, Any] = {}

        async def run(name: str, check: Any, what: str) -> None:
            try:
                await asyncio.wait_for(check(), READINESS_TIMEOUT_SECONDS)
                checks[name] = "ok"
            except TimeoutError:
                checks[name] = f"{what}: no answer within {READINESS_TIMEOUT_SECONDS:.0f}s"
            except GatewayError as err:
                checks[name] = str(err) or what
            except Exception as err:  # driver and socket errors: first line only (no SQL, no URLs)
                detail = (str(err).strip() or type(err).__name__).splitlines()[0][:300]
                checks[name] = f"{what}: {detail}"

        if self._store is None:
            checks["store"] = "not running"
        else:
            await asyncio.gather(
                run("store", self._store.ping, f"{self._store.dialect} store unreachable"),
                *(
                    run(f"transport:{name}", t.check, f"transport {name} unreachable")
                    for name, t in self.transports.items()
                ),
            )
        return all(v == "ok" for v in checks.values()), checks
