"""The SQLite store's own thread: each transaction runs whole there, and its caller hears back."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from gateway.store.store import _SqliteThread

pytestmark = pytest.mark.anyio


@pytest.fixture
async def worker() -> AsyncIterator[_SqliteThread]:
    thread = _SqliteThread()
    yield thread
    thread.stop()


async def on_which_thread() -> str:
    return threading.current_thread().name


async def fails() -> None:
    raise ValueError("constraint failed")


async def test_a_transaction_runs_on_the_sqlite_thread_and_its_result_reaches_the_caller(
    worker: _SqliteThread,
) -> None:
    assert await worker.run(on_which_thread()) == "gateway-sqlite"


async def test_a_transactions_error_is_raised_in_the_caller(worker: _SqliteThread) -> None:
    with pytest.raises(ValueError, match="constraint failed"):
        await worker.run(fails())


async def test_a_transaction_that_suspends_is_refused_and_closed(worker: _SqliteThread) -> None:
    cleaned_up = threading.Event()

    async def suspends() -> None:
        try:
            await asyncio.sleep(0)
        finally:
            cleaned_up.set()

    with pytest.raises(RuntimeError, match="suspended"):
        await worker.run(suspends())
    assert cleaned_up.is_set()


async def test_a_transaction_whose_caller_gave_up_before_it_started_never_runs(
    worker: _SqliteThread,
) -> None:
    release, started, ran = threading.Event(), threading.Event(), threading.Event()

    async def holds_the_thread() -> None:
        started.set()
        release.wait(10)

    async def should_not_run() -> None:
        ran.set()

    first = asyncio.create_task(worker.run(holds_the_thread()))
    await asyncio.to_thread(started.wait, 10)
    second = asyncio.create_task(worker.run(should_not_run()))
    await asyncio.sleep(0)  # queued behind the first
    second.cancel()
    await asyncio.sleep(0)
    release.set()
    await first
    assert await worker.run(on_which_thread()) == "gateway-sqlite"  # everything before it is done
    assert second.cancelled() and not ran.is_set()


async def test_after_stop_a_transaction_is_refused_instead_of_waiting_forever() -> None:
    thread = _SqliteThread()
    thread.stop()
    with pytest.raises(RuntimeError, match="closed"):
        await asyncio.wait_for(thread.run(on_which_thread()), 5)
