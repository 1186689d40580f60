"""The notification tests' parts: a signing webhook receiver on loopback, and notifiers built from a
`notifications:` section as cedargate.yaml would give it, on the override workflow of tests/proxy/conftest.py
(a real database: a SQLite file, and a throw-away PostgreSQL schema)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from notify_support import APPROVERS, SECRET

from proxy.notify.notifier import Notifier
from proxy.oversight.workflow import OverrideWorkflow
from proxy.settings.notifications import Notifications
from tests.support.receiver import Receiver, webhook_receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver(SECRET.encode()) as served:
        yield served


@pytest.fixture
def make_notifier(workflow: OverrideWorkflow) -> Iterator[Callable[..., Notifier]]:
    made: list[Notifier] = []

    def make(config: Notifications, environ: dict[str, str] | None = None) -> Notifier:
        notifier = Notifier(workflow.store.engine, config, APPROVERS, lambda: "http://127.0.0.1:8081",
                            environ={"CEDARGATE_HOOK_SECRET": SECRET} if environ is None else environ)
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close()


