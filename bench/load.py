"""Closed-loop load: N clients, each doing one operation after another, for a bounded time.

A warm-up phase (not counted) comes first, then every client runs until the
deadline; throughput is completed operations over the time until the last one
finished. Async clients share the driver's event loop; thread clients (the
blocking peers) each get a thread.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

AsyncOp = Callable[[], Awaitable[None]]
SyncOp = Callable[[], None]


class Meter(Protocol):
    """Measures something over the counted phase only (warm-up excluded); see procs.CpuMeter."""

    def start(self) -> None: ...

    def stop(self) -> dict[str, float]: ...


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Result:
    """What one measurement saw: per-operation latencies (seconds), errors and wall time."""

    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    #: CPU seconds per process over the counted phase, when a meter was given
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def ops(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    def cpu_ms_per_op(self, process: str) -> float:
        """Milliseconds of `process`'s CPU per completed operation."""
        return self.cpu[process] / self.ops * 1000 if self.ops and process in self.cpu else float("nan")

    @property
    def mean(self) -> float:
        return statistics.fmean(self.latencies) if self.latencies else float("nan")

    def note_error(self, err: BaseException) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = f"{type(err).__name__}: {err}"[:300]


def combined(parts: Sequence[Result]) -> Result:
    """One figure from several measured turns of the same clients: their operations, errors,
    CPU and seconds added up (throughput is then over the measured time of all turns)."""
    whole = Result(clients=parts[0].clients)
    for part in parts:
        whole.seconds += part.seconds
        whole.latencies.extend(part.latencies)
        whole.errors += part.errors
        whole.first_error = whole.first_error or part.first_error
        for process, seconds in part.cpu.items():
            whole.cpu[process] = whole.cpu.get(process, 0.0) + seconds
    return whole


async def run_async(
    ops: Sequence[AsyncOp], seconds: float, warmup: float, meter: Meter | None = None
) -> Result:
    """Each op is one client's next operation; run them all in a closed loop."""

    async def loop(op: AsyncOp, until: float, result: Result | None) -> None:
        while time.perf_counter() < until:
            started = time.perf_counter()
            try:
                await op()
            except Exception as err:
                if result is None:
                    raise
                result.note_error(err)
                continue
            if result is not None:
                result.latencies.append(time.perf_counter() - started)

    if warmup > 0:
        until = time.perf_counter() + warmup
        await asyncio.gather(*(loop(op, until, None) for op in ops))
    result = Result(clients=len(ops))
    if meter is not None:
        meter.start()
    started = time.perf_counter()
    await asyncio.gather(*(loop(op, started + seconds, result) for op in ops))
    result.seconds = time.perf_counter() - started
    if meter is not None:
        result.cpu = meter.stop()
    return result


def run_threads(ops: Sequence[SyncOp], seconds: float, warmup: float) -> Result:
    """The same closed loop with one thread per client, for blocking clients."""
    result = Result(clients=len(ops))
    lock = threading.Lock()
    barrier = threading.Barrier(len(ops) + 1)
    window: dict[str, float] = {}
    problems: list[BaseException] = []

    def client(op: SyncOp) -> None:
        try:
            until = time.perf_counter() + warmup
            while time.perf_counter() < until:
                op()
        except BaseException as err:
            problems.append(err)
        barrier.wait()
        barrier.wait()  # the main thread has set the window
        while time.perf_counter() < window["end"]:
            started = time.perf_counter()
            try:
                op()
            except Exception as err:
                with lock:
                    result.note_error(err)
                continue
            elapsed = time.perf_counter() - started
            with lock:
                result.latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(op,), daemon=True) for op in ops]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    window["end"] = started if problems else started + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    if problems:
        raise RuntimeError(f"warm-up failed: {problems[0]!r}") from problems[0]
    result.seconds = time.perf_counter() - started
    return result
