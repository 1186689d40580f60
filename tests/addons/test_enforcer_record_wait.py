"""How the enforcer waits for its record's commit (`addons.enforcer.all_done`): futures resolved on another
thread wake the call, a stalled commit ends the wait with TimeoutError (the call is then refused 503), and a
failed commit ends it too, for the caller to read."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

import pytest

from addons.enforcer import all_done


def _resolve_later(future: Future[None], delay: float, exc: Exception | None = None) -> None:
    def resolve() -> None:
        time.sleep(delay)
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)

    threading.Thread(target=resolve, daemon=True).start()


def test_the_wait_ends_when_every_commit_is_done_on_the_writer_thread():
    async def run() -> float:
        futures: list[Future[None]] = [Future(), Future(), Future()]
        futures[0].set_result(None)  # one committed before the wait
        _resolve_later(futures[1], 0.05)
        _resolve_later(futures[2], 0.2)
        started = time.monotonic()
        await all_done(futures, 10.0)
        assert all(f.done() for f in futures)
        return time.monotonic() - started

    assert asyncio.run(run()) < 10.0


def test_a_commit_that_does_not_come_in_time_ends_the_wait_with_timeout_error():
    async def run() -> None:
        done, stalled = Future(), Future()
        done.set_result(None)
        with pytest.raises(TimeoutError):
            await all_done([done, stalled], 0.1)
        assert not stalled.done()  # the wait gives up; the commit itself goes on (the row is retried)

    asyncio.run(run())


def test_a_failed_commit_ends_the_wait_and_says_why_to_whoever_reads_it():
    async def run() -> None:
        failed: Future[None] = Future()
        _resolve_later(failed, 0.01, RuntimeError("the store failed"))
        await all_done([failed], 10.0)
        with pytest.raises(RuntimeError, match="the store failed"):
            failed.result(0)

    asyncio.run(run())
