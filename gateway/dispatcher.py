"""The dispatcher: sends recorded deliveries with retries, rate limits and failover.

Inline, right after `sendemail` recorded an escalation, each delivery gets up to
EMAIL_RETRY_COUNT attempts per transport within EMAIL_TIMEOUT_SECONDS. What is
still not sent stays queued in the store, and the background loop (on any
replica) retries it with growing delays until the retry horizon, then marks it
failed. The same loop asks tracking transports (ACS) for delivery confirmation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from gateway.config import Settings
from gateway.errors import (
    ConfigError,
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from gateway.logs import mask_address
from gateway.metrics import Metrics
from gateway.store import SCRUB_BATCH, DeliveryRecord, Outcome, Store
from gateway.transport import OutgoingMessage, Receipt, StatusUpdate, Transport

log = logging.getLogger("gateway.dispatcher")

#: how many times the background loop tries to record one outcome before leaving it to the lease
RECORD_ATTEMPTS = 3
#: how often the retention job looks for deliveries to scrub (store.retention_days)
SCRUB_EVERY_SECONDS = 3600.0
#: store transactions one retention round runs at most before the dispatcher goes on sending
SCRUB_BATCHES_PER_ROUND = 10

_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


def parse_rate_limits(name: str, raw: Any) -> list[tuple[int, float]]:
    """`["30/minute", "100/hour", "2/5 seconds"]` -> [(30, 60.0), (100, 3600.0), (2, 5.0)]."""
    if raw is None:
        return []
    items = [raw] if isinstance(raw, str) else raw
    windows = []
    for item in items:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)?\s*(second|minute|hour|day)s?\s*", str(item))
        if not match or int(match.group(1)) < 1 or match.group(2) == "0":
            raise ConfigError(
                f"transports.{name}.rate_limits: {item!r} is not a rate; "
                "write it like '30/minute' or '100/hour'"
            )
        windows.append((int(match.group(1)), int(match.group(2) or 1) * _UNITS[match.group(3)]))
    return windows


class Throttled(Exception):
    """A transport's send-rate budget is spent; a slot frees in `wait` seconds."""

    def __init__(self, transport: str, wait: float) -> None:
        super().__init__(f"rate limit of transport {transport}: next slot in {wait:.0f}s")
        self.wait = wait


@dataclass
class _Tally:
    attempts: int = 0  # made in this round
    before: int = 0  # made in earlier rounds (the delivery's record)


class _WaitRetryAfter(wait_exponential_jitter):
    """Exponential backoff with jitter, but never shorter than the provider's Retry-After."""

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = super().__call__(retry_state)
        error = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(error, "retry_after", None)
        return max(wait, float(hint)) if hint else wait


#: tenacity's wait and retry strategies hold no state: built once, not for every send
_BACKOFF = _WaitRetryAfter(multiplier=0.25, max=5.0, jitter=0.25)
_RETRY_TRANSIENT = retry_if_exception_type(TransientDeliveryError)


def now_utc() -> datetime:
    return datetime.now(UTC)


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        transports: dict[str, Transport],
        metrics: Metrics,
        owner: str,
        rate_limits: dict[str, list[tuple[int, float]]],
    ) -> None:
        self.settings = settings
        self.store = store
        self.chain = [transports[name] for name in settings.transport_chain]
        self.metrics = metrics
        self.owner = owner
        self.limits = rate_limits
        # A delivery's lease outlives its send deadline by a margin; only then may another process take over.
        self.lease = timedelta(
            seconds=settings.email.timeout_seconds + settings.dispatcher.lease_margin_seconds
        )
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], DeliveryRecord] = {}
        # Sends inside sendemail calls, and deliveries whose send such a call cut off before an
        # outcome (cancelled, shutdown): their leases go back at the next round (`_give_back`).
        self._inline: dict[asyncio.Task[Outcome], DeliveryRecord] = {}
        self._cut_off: set[str] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._counted_at: float | None = None
        self._scrub_after = 0.0  # monotonic time of the next retention round
        # Outcomes waiting for the next store write, and the task writing them (`_record_soon`).
        self._unrecorded: list[tuple[Outcome, asyncio.Future[None]]] = []
        self._recorder: asyncio.Task[None] | None = None

    # -- inline sending (inside the sendemail call) ----------------------------------------------

    def lease_until(self, now: datetime) -> datetime:
        return now + self.lease

    async def send_now(
        self, records: Sequence[DeliveryRecord], context: dict[str, Any]
    ) -> list[DeliveryRecord]:
        """Send freshly recorded (and leased) deliveries concurrently; record and return them."""

        async def send_and_record(record: DeliveryRecord) -> Outcome:
            try:
                outcome = await self._deliver(record, inline=True, context=context)
            except BaseException:
                # No outcome, so nothing will release the lease: give it back now, and the
                # background dispatcher takes the delivery over without waiting for it to expire.
                self._cut_off.add(record.id)
                self._wake.set()
                raise
            # Record each outcome the moment it is known, not when its sibling is done retrying:
            # a crash in between would make another replica send the accepted message again.
            await self._record_soon(outcome)
            return outcome

        tasks = [asyncio.create_task(send_and_record(r)) for r in records]
        for task, record in zip(tasks, records, strict=True):
            self._inline[task] = record
            task.add_done_callback(self._inline.pop)
        outcomes = await asyncio.gather(*tasks)
        if any(o.status == "queued" for o in outcomes):
            self._wake.set()
        return [_apply(r, o) for r, o in zip(records, outcomes, strict=True)]

    # -- one delivery ----------------------------------------------------------------------------

    async def _deliver(self, record: DeliveryRecord, *, inline: bool, context: dict[str, Any]) -> Outcome:
        message = record.message()
        started = time.monotonic()
        deadline = started + self.settings.email.timeout_seconds
        tally = _Tally(before=record.attempts)
        last: DeliveryError | None = None
        transient = False  # some transport failed only for now: worth trying again later
        extra = {**context, "role": record.role, "recipient": _shown(record)}
        for position, transport in enumerate(self.chain):
            tries = self._tries(inline, tally, transports_left=len(self.chain) - position)
            try:
                receipt = await self._send_with_retries(transport, message, deadline, tries, tally, extra)
            except Throttled as throttled:
                log.info("rate limit reached; delivery queued", extra={**extra, "transport": transport.name})
                return self._queued(record, tally, transport.name, str(throttled), throttled.wait)
            except PermanentDeliveryError as err:
                last = err
                if err.transport_level:
                    log.warning(
                        "transport unusable, failing over: %s",
                        err,
                        extra={**extra, "transport": transport.name},
                    )
                    continue
                log.warning(
                    "delivery failed permanently: %s", err, extra={**extra, "transport": transport.name}
                )
                return self._failed(record, tally, transport.name, str(err))
            except TransientDeliveryError as err:
                last, transient = err, True
                continue
            return self._sent(record, tally, transport, receipt, time.monotonic() - started, extra)
        assert last is not None
        # Nothing refused this message itself: the transports were down or unusable (credentials,
        # misconfiguration), which a later attempt or a fixed configuration can cure. It stays
        # queued with growing delays, up to the retry horizon, never failed outright.
        retry_after = last.retry_after if isinstance(last, TransientDeliveryError) else None
        error = str(last) if transient else f"no transport is usable: {last}"
        return self._queued(record, tally, self.chain[-1].name, error, retry_after, backoff=True)

    def _tries(self, inline: bool, tally: _Tally, transports_left: int) -> int:
        """Attempts for the next transport: EMAIL_RETRY_COUNT is per delivery, shared along the
        failover chain, and every transport gets at least one (the background makes one each)."""
        if not inline:
            return 1
        budget = self.settings.email.retry_count - tally.attempts
        return max(1, budget - (transports_left - 1))

    async def _send_with_retries(
        self,
        transport: Transport,
        message: OutgoingMessage,
        deadline: float,
        tries: int,
        tally: _Tally,
        extra: dict[str, Any],
    ) -> Receipt:
        name = transport.name

        async def attempt() -> Receipt:
            await self._take_slot(name, deadline)
            tally.attempts += 1
            return await self._attempt(transport, message, deadline, tally.before + tally.attempts, extra)

        try:
            # Nearly every send succeeds at once, and tenacity's loop costs more CPU than the
            # gateway's own part of a send (bench/): it is set up only when a retry may follow.
            return await attempt()
        except TransientDeliveryError as err:
            if tries <= 1:
                raise
            failed = err
        window = max(0.0, deadline - time.monotonic())
        retrying = AsyncRetrying(
            stop=stop_after_attempt(tries) | stop_before_delay(window),
            wait=_BACKOFF,
            retry=_RETRY_TRANSIENT,
            reraise=True,
            before_sleep=lambda _state: self.metrics.retries.labels(name).inc(),
        )
        async for retry in retrying:
            with retry:
                if retry.retry_state.attempt_number == 1:
                    raise failed  # the attempt above: tenacity decides on and paces what follows
                return await attempt()
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _take_slot(self, name: str, deadline: float) -> None:
        windows = self.limits.get(name)
        if not windows:
            return
        while True:
            wait = await self.store.take_rate_slot(name, windows, now_utc())
            if wait <= 0:
                return
            if time.monotonic() + wait >= deadline:
                raise Throttled(name, wait)
            await asyncio.sleep(wait)

    async def _attempt(
        self,
        transport: Transport,
        message: OutgoingMessage,
        deadline: float,
        attempt: int,
        extra: dict[str, Any],
    ) -> Receipt:
        name = transport.name
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransientDeliveryError(f"no time left within EMAIL_TIMEOUT_SECONDS for {name}")
        started = time.monotonic()
        try:
            async with asyncio.timeout(remaining):
                receipt = await transport.send(message)
        except TimeoutError:
            self.metrics.send_attempts.labels(name, "transient").inc()
            raise TransientDeliveryError(f"{name} did not answer within {remaining:.1f}s") from None
        except DeliveryError as err:
            kind = "permanent" if isinstance(err, PermanentDeliveryError) else "transient"
            self.metrics.send_attempts.labels(name, kind).inc()
            log.info("attempt failed: %s", err, extra={**extra, "transport": name, "attempt": attempt})
            raise
        except Exception as err:  # a transport bug must not lose the escalation
            self.metrics.send_attempts.labels(name, "transient").inc()
            log.exception(
                "transport %s raised an unmapped %s",
                name,
                type(err).__name__,
                extra={**extra, "transport": name},
            )
            raise TransientDeliveryError(f"{name} failed unexpectedly ({type(err).__name__})") from err
        elapsed = time.monotonic() - started
        self.metrics.send_attempts.labels(name, "ok").inc()
        self.metrics.send_latency.labels(name).observe(elapsed)
        return receipt

    # -- outcomes --------------------------------------------------------------------------------

    def _sent(
        self,
        record: DeliveryRecord,
        tally: _Tally,
        transport: Transport,
        receipt: Receipt,
        seconds: float,
        extra: dict[str, Any],
    ) -> Outcome:
        now = now_utc()
        check_at = None
        if receipt.status == "sent" and transport.tracks_delivery:
            check_at = now + timedelta(seconds=self.settings.dispatcher.first_status_check_seconds)
        who = "customer" if record.role == "customer" else "support team"
        log.info(
            "Email sent to %s: %s",
            who,
            _shown(record),
            extra={
                **extra,
                "transport": transport.name,
                "attempt": tally.before + tally.attempts,
                "duration_ms": round(seconds * 1000, 1),
            },
        )
        return Outcome(
            delivery_id=record.id,
            status=receipt.status,
            transport=transport.name,
            attempts_added=tally.attempts,
            next_attempt_at=check_at,
            provider_id=receipt.provider_id,
            sent_at=now,
            finished_at=now if receipt.status == "delivered" else None,
        )

    def _failed(self, record: DeliveryRecord, tally: _Tally, transport: str, error: str) -> Outcome:
        now = now_utc()
        return Outcome(
            delivery_id=record.id,
            status="failed",
            transport=transport,
            attempts_added=tally.attempts,
            error=error,
            finished_at=now,
        )

    def _queued(
        self,
        record: DeliveryRecord,
        tally: _Tally,
        transport: str,
        error: str,
        retry_after: float | None,
        *,
        backoff: bool = False,
    ) -> Outcome:
        now = now_utc()
        delay = retry_after or 0.0
        if backoff:
            delay = max(delay, self._backoff(record.attempts + tally.attempts))
        next_at = now + timedelta(seconds=delay)
        if next_at > record.give_up_at:
            attempts = record.attempts + tally.attempts
            return self._failed(record, tally, transport, f"gave up after {attempts} attempts: {error}")
        return Outcome(
            delivery_id=record.id,
            status="queued",
            transport=transport,
            attempts_added=tally.attempts,
            next_attempt_at=next_at,
            error=error,
        )

    def _backoff(self, attempts: int) -> float:
        cap = self.settings.dispatcher.max_backoff_seconds
        base = min(cap, 2.0 * 2 ** min(attempts, 20))
        return base * random.uniform(0.8, 1.2)

    async def _record_soon(self, outcome: Outcome) -> None:
        """Record one outcome now, in one store write with any others that arrive meanwhile.

        Each outcome taking its own write transaction (one at a time on SQLite) capped the
        throughput; outcomes known while a write is in flight go together in the next one.
        """
        written = asyncio.get_running_loop().create_future()
        self._unrecorded.append((outcome, written))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record_waiting(), name="gateway-recorder")
        await written

    async def _record_waiting(self) -> None:
        while self._unrecorded:
            batch, self._unrecorded = self._unrecorded, []
            error: BaseException | None = None
            try:
                await self._record([outcome for outcome, _ in batch])
            except BaseException as err:
                error = err
            for _, written in batch:
                if written.done():  # its caller was cancelled; the outcome is recorded all the same
                    continue
                if error is None:
                    written.set_result(None)
                elif isinstance(error, Exception):
                    written.set_exception(error)
                else:
                    written.cancel()
            if error is not None and not isinstance(error, Exception):
                raise error

    async def _record(self, outcomes: Sequence[Outcome]) -> None:
        lost = await self.store.record(outcomes, self.owner)
        for delivery_id in lost:
            log.error(
                "lease on delivery %s was lost before its outcome was recorded; another process "
                "may send it again (raise EMAIL_TIMEOUT_SECONDS or check clocks)",
                delivery_id,
            )

    # -- background loop -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="gateway-dispatcher")

    async def _run(self) -> None:
        interval = self.settings.dispatcher.poll_interval_seconds
        while not self._stopping.is_set():
            try:
                await self._tick()
            except Exception:
                log.exception("dispatcher round failed; trying again in %.1fs", interval)
            await self._scrub_old()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()

    async def _give_back(self) -> None:
        """Release the leases of deliveries whose inline send was cut off (see `send_now`)."""
        if self._cut_off:
            ids, self._cut_off = self._cut_off, set()
            await self.store.release(ids, self.owner)

    async def _tick(self) -> None:
        await self._give_back()
        refresh = self.settings.dispatcher.gauge_refresh_seconds
        if self._counted_at is None or time.monotonic() - self._counted_at >= refresh:
            # A count over the whole table: worth doing now and then, not every round.
            self._counted_at = time.monotonic()
            counts = await self.store.count_by_status()
            for status in ("queued", "sent", "delivered", "failed"):
                self.metrics.deliveries.labels(status).set(counts.get(status, 0))
        free = self.settings.dispatcher.concurrency - len(self._tasks)
        if free <= 0 or self._stopping.is_set():
            return
        now = now_utc()
        due = await self.store.claim_due(
            owner=self.owner,
            now=now,
            lease_until=self.lease_until(now),
            limit=min(free, self.settings.dispatcher.batch_size),
        )
        for record in due:
            task = asyncio.create_task(self._process(record))
            self._tasks[task] = record
            task.add_done_callback(self._tasks.pop)

    async def _scrub_old(self) -> None:
        """The retention job, after a round's sending: hourly, or at the next round again while a
        backlog remains. Its failure is logged and never stops the sending."""
        days = self.settings.store.retention_days
        if days is None or self._stopping.is_set() or time.monotonic() < self._scrub_after:
            return
        self._scrub_after = time.monotonic() + SCRUB_EVERY_SECONDS
        try:
            _, more = await self.scrub(days, SCRUB_BATCHES_PER_ROUND)
        except Exception:
            log.exception("retention round failed; trying again in %.0f s", SCRUB_EVERY_SECONDS)
            return
        if more:
            self._scrub_after = time.monotonic()

    async def scrub(self, days: int, max_batches: int | None = None) -> tuple[int, bool]:
        """Scrub finished deliveries older than `days`, one store transaction per batch; returns
        how many, and whether more may remain after `max_batches`."""
        now = now_utc()
        scrubbed, batches, more = 0, 0, True
        while more and (max_batches is None or batches < max_batches):
            done = await self.store.scrub(now - timedelta(days=days), now)
            scrubbed, batches, more = scrubbed + done, batches + 1, done == SCRUB_BATCH
        if scrubbed:
            self.metrics.scrubbed.inc(scrubbed)
            log.info("retention: scrubbed %d finished deliveries older than %d days", scrubbed, days)
        return scrubbed, more

    async def _process(self, record: DeliveryRecord) -> None:
        context = {
            "ticket_id": record.headers.get("X-Ticket-ID"),
            "email_id": record.email_id,
            "use_case": record.use_case,
        }
        try:
            if record.status == "queued":
                outcome = await self._deliver(record, inline=False, context=context)
                self._count(record, outcome)
            else:
                outcome = await self._confirm(record)
        except Exception:
            # A bug, not a delivery outcome: the lease runs out and the delivery is tried again.
            log.exception("processing delivery %s failed", record.id, extra=context)
            return
        for attempt in range(1, RECORD_ATTEMPTS + 1):
            try:
                await self._record([outcome])
                return
            except Exception:
                if attempt == RECORD_ATTEMPTS:
                    # Sent but not recorded: the lease runs out and the message goes again, with the
                    # same Message-ID. Say so loudly; there is nothing better to do without a store.
                    log.exception(
                        "could not record the outcome of delivery %s (%s)",
                        record.id,
                        outcome.status,
                        extra=context,
                    )
                    return
                await asyncio.sleep(0.2 * attempt)

    def _count(self, record: DeliveryRecord, outcome: Outcome) -> None:
        self.metrics.emails.labels(
            record.use_case, record.role, outcome.transport or "none", outcome.status
        ).inc()

    async def _confirm(self, record: DeliveryRecord) -> Outcome:
        """Ask a tracking transport whether an accepted message was delivered."""
        keep = partial(
            Outcome,
            delivery_id=record.id,
            status=record.status,
            transport=record.transport,
            attempts_added=0,
            error=record.last_error,
        )
        transport = next((t for t in self.chain if t.name == record.transport), None)
        if transport is None or not transport.tracks_delivery:
            return keep()  # nobody can confirm it: stop asking
        now = now_utc()
        try:
            update = await transport.status(Receipt(status=record.status, provider_id=record.provider_id))
        except PermanentDeliveryError as err:
            return keep(error=f"delivery status unavailable: {err}")
        except DeliveryError as err:
            update = StatusUpdate(status=record.status, retry_after=getattr(err, "retry_after", None))
        if update.status in ("delivered", "failed"):
            if update.status == "delivered" and record.sent_at is not None:
                self.metrics.confirmation_latency.labels(transport.name).observe(
                    (now - record.sent_at).total_seconds()
                )
            self.metrics.emails.labels(record.use_case, record.role, transport.name, update.status).inc()
            return keep(status=update.status, error=update.error, finished_at=now)
        # Not final yet: ask again, less often as the message ages, never past the horizon.
        age = (now - (record.sent_at or record.created_at)).total_seconds()
        next_at = now + timedelta(seconds=max(update.retry_after or 0.0, min(60.0, max(1.0, age / 4))))
        return keep(next_attempt_at=None if next_at > record.give_up_at else next_at)

    async def stop(self, grace: float) -> None:
        """Stop claiming; let in-flight sends finish within `grace`; give the rest back."""
        self._stopping.set()
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
        running: dict[asyncio.Task[Any], DeliveryRecord] = {**self._tasks, **self._inline}
        if running:
            _, pending = await asyncio.wait(list(running), timeout=grace)
            if pending:
                background = [running[task].id for task in pending if task in self._tasks]
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                await self.store.release(background, self.owner)
                log.warning("%d deliveries were still being sent at shutdown; left pending", len(pending))
        # Outcomes already known (a call may have been cut off while its outcome waited for the
        # store) are written first; only then go back the leases of sends that had no outcome.
        if self._recorder is not None:
            await asyncio.gather(self._recorder, return_exceptions=True)
        await self._give_back()


def _apply(record: DeliveryRecord, outcome: Outcome) -> DeliveryRecord:
    record.status = outcome.status
    record.attempts += outcome.attempts_added
    record.transport = outcome.transport or record.transport
    record.last_error = outcome.error
    record.next_attempt_at = outcome.next_attempt_at
    record.provider_id = outcome.provider_id or record.provider_id
    record.sent_at = outcome.sent_at or record.sent_at
    return record


def _shown(record: DeliveryRecord) -> str:
    """Customer addresses are masked in logs; the bank's own team address is not."""
    return mask_address(record.address) if record.role == "customer" else record.address
