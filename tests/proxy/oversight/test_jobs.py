"""The core's background jobs: expiry runs on the composing program's loop until it is stopped, and a
failing run does not end it."""

from __future__ import annotations

import asyncio

import pytest
from test_workflow import open_request

from proxy.oversight.jobs import Jobs
from proxy.oversight.workflow import OverrideWorkflow


async def until(condition, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_started_jobs_expire_a_due_request_and_wake_its_hold_until_stopped(workflow: OverrideWorkflow):
    due = open_request(workflow, expires_in=0)
    jobs = Jobs(workflow, expiry_interval=0.01)

    async def scenario() -> bool:
        jobs.start()
        jobs.start()  # a second start changes nothing
        try:
            with workflow.holds.watching(due.id) as woken:
                return await asyncio.wait_for(woken.wait(), 10) or True
        finally:
            jobs.stop()

    assert asyncio.run(scenario())
    assert workflow.store.get(due.id).status == "expired"
    assert not jobs.running


def test_a_failing_run_does_not_end_the_job(workflow: OverrideWorkflow, caplog: pytest.LogCaptureFixture):
    runs: list[int] = []
    original = workflow.expire_due

    def flaky() -> list:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("the store is away")
        return original()

    workflow.expire_due = flaky  # type: ignore[method-assign]
    jobs = Jobs(workflow, expiry_interval=0.01)

    async def scenario() -> None:
        jobs.start()
        try:
            await until(lambda: len(runs) >= 3, "three runs of the expiry job")
        finally:
            jobs.stop()

    asyncio.run(scenario())
    assert "override expiry failed" in caplog.text
