"""The core's background jobs: override expiry, escalation chains (each tier reached and each reminder
announced once, `OverrideWorkflow.advance_due`), clearing decisions' Cedar requests past their retention
(`proxy.record.retention`), the wake-ups of held calls by decisions made in other processes
(`proxy.oversight.wakeups`), and the jobs others add (`add`): the notifications' sweep, composed in
`proxy.runtime` (this package knows no channel).

The core owns what the jobs do and how often; whoever composes the running program starts them on its
event loop and stops them at the end: `cedargate run` (`proxy.cli.serve`), and the enforcer addon when
it builds its own core under stock `mitmdump -s addons/enforcer.py`. A job's failure (a store hiccup) is
logged and the job runs again next time: it never ends for good.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.oversight.wakeups import Wakeups
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record.retention import RequestRetention

log = logging.getLogger(__name__)

EXPIRY_INTERVAL = 1.0  # seconds between expiry runs: how late a hold hears that its request expired
RETENTION_INTERVAL = 60.0  # seconds between clearings of Cedar requests past their retention
FAILURE_LOG_INTERVAL = 60.0  # seconds between two lines about a job that keeps failing
# Seconds between chain runs: how late a tier reached or a reminder is announced at most. A run reads
# only the requests with a step due (an index on `next_step_at`), so an idle store costs one small query.
CHAIN_INTERVAL = 1.0


@dataclass(frozen=True)
class Job:
    name: str
    interval: float
    run: Callable[[], object]  # blocking: run on a worker thread, off the event loop
    stop: Callable[[], object] | None = None  # called once when the jobs stop (give back a lease, say)


class Jobs:
    def __init__(self, workflow: OverrideWorkflow, *, expiry_interval: float = EXPIRY_INTERVAL,
                 chain_interval: float = CHAIN_INTERVAL, retention: RequestRetention | None = None,
                 retention_interval: float = RETENTION_INTERVAL) -> None:
        self.jobs = [Job("override expiry", expiry_interval, workflow.expire_due),
                     Job("escalation chains", chain_interval, workflow.advance_due)]
        if retention is not None:
            self.jobs.append(Job("cedar request retention", retention_interval, retention.run))
        self.wakeups = Wakeups(workflow.store.engine, workflow.holds)
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, job: Job) -> None:
        """One more sweep, started with the others (by the process that runs the sweeps)."""
        self.jobs.append(job)

    @property
    def running(self) -> bool:
        return any(not task.done() for task in self._tasks)

    def start(self, *, sweeps: bool = True) -> None:
        """Start every job on the running event loop; starting twice changes nothing.

        `sweeps=False` starts only the wake-ups, for a process that holds calls while another runs the
        sweeps once for all of them (a proxy worker of `cedargate run --workers N`).
        """
        if sweeps and not self.running:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._every(job), name=f"cedargate {job.name}") for job in self.jobs]
        self.wakeups.start()  # threads of their own: they block on the database, not on this loop

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self.wakeups.stop()
        for job in self.jobs:
            if job.stop is not None:
                try:
                    job.stop()
                except Exception:  # one job's cleanup must not keep the others' from running
                    log.exception("stopping %s failed", job.name)

    @staticmethod
    async def _every(job: Job) -> None:
        failures, said = 0, -FAILURE_LOG_INTERVAL
        while True:
            await asyncio.sleep(job.interval)
            try:
                await asyncio.to_thread(job.run)
            except Exception as exc:  # a store hiccup must not end the job for good
                # Said with its traceback when it starts, then once a minute with a count: a job failing
                # every second (the store away, the process out of files) must not flood the log.
                failures += 1
                now = time.monotonic()
                if failures == 1:
                    log.exception("%s failed", job.name)
                    said = now
                elif now - said >= FAILURE_LOG_INTERVAL:
                    log.error("%s still failing (%d times so far): %s", job.name, failures, exc)
                    said = now
            else:
                if failures > 1:
                    log.info("%s runs again, after failing %d times", job.name, failures)
                failures = 0
