"""The core's background jobs: expiry runs on the composing program's loop until it is stopped, and a
failing run does not end it."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import pytest
from test_workflow import open_request

from proxy.oversight.jobs import Jobs
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record.retention import RequestRetention
from proxy.record.store import utcnow


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


def test_the_retention_job_clears_requests_past_their_retention_until_stopped(workflow: OverrideWorkflow):
    retention = RequestRetention(workflow.recorder, timedelta(days=1).total_seconds())
    jobs = Jobs(workflow, expiry_interval=60, retention=retention, retention_interval=0.01)
    workflow.recorder.record({
        "decision_id": "d-1", "at": utcnow() - timedelta(days=2), "agent": "ops-bot", "method": "GET",
        "scheme": "https", "host": "api.example", "port": 443, "path": "/", "action": 'Action::"get"',
        "resource": 'Host::"api.example"', "decision": "allow", "determining_policies": "[]", "errors": "[]",
        "policy_revision": "r1", "upstream_status": None, "duration_ms": None, "session": None, "tool": None,
        "cedar_request": "{}"})
    assert workflow.recorder.flush()

    async def scenario() -> None:
        jobs.start()
        try:
            await until(lambda: retention.cleared == 1, "the request cleared")
        finally:
            jobs.stop()

    asyncio.run(scenario())
    assert not jobs.running


def test_a_job_failing_run_after_run_is_logged_once_not_once_a_run(workflow: OverrideWorkflow,
                                                                   caplog: pytest.LogCaptureFixture):
    """The store away, or the process out of files: every run fails, and the log says so once."""
    caplog.set_level(logging.INFO, "proxy.oversight.jobs")
    runs: list[int] = []

    def failing() -> list:
        runs.append(1)
        if len(runs) <= 20:
            raise OSError(24, "Too many open files")
        return []

    workflow.expire_due = failing  # type: ignore[method-assign]
    jobs = Jobs(workflow, expiry_interval=0.001)

    async def scenario() -> None:
        jobs.start()
        try:
            await until(lambda: len(runs) >= 22, "twenty failed runs and two good ones")
        finally:
            jobs.stop()

    asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if "override expiry" in r.getMessage()]
    assert lines == ["override expiry failed", "override expiry runs again, after failing 20 times"]
