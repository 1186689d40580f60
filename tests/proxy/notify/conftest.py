"""The notification tests' parts: the override workflow on a real database (a SQLite file, and a
throw-away PostgreSQL schema), a signing webhook receiver on loopback, and a notifier built from a
`notifications:` section as cedargate.yaml would give it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from proxy_support import make_call

from proxy.cedar.escalation import Escalation, Requirement
from proxy.notify.notifier import Notifier
from proxy.oversight.holds import Holds
from proxy.oversight.overrides import Override, OverrideStore
from proxy.oversight.workflow import OverrideWorkflow
from proxy.record.store import Recorder, make_engine
from proxy.settings.config import ApproverCredential
from proxy.settings.notifications import Notifications
from tests.support.receiver import Receiver, webhook_receiver

SECRET = "whsec-test-5a1f"
MANAGER = Requirement("protect-production-instances", ("engineering-manager",), 1)
SECURITY = Requirement("no-volume-deletion", ("security",), 1)
APPROVERS = {
    "erin": ApproverCredential(token_env="E", roles=("engineering-manager",), email="erin@example.test"),
    "max": ApproverCredential(token_env="M", roles=("engineering-manager",)),
    "sam": ApproverCredential(token_env="S", roles=("security",), email="sam@example.test"),
}


@pytest.fixture
def workflow(database_url: str) -> Iterator[OverrideWorkflow]:
    database = make_engine(database_url)
    recorder = Recorder(database)
    try:
        yield OverrideWorkflow(OverrideStore(database), recorder, Holds())
    finally:
        recorder.close()
        database.dispose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver(SECRET.encode()) as served:
        yield served


def webhook_config(receiver: Receiver, **routes: Any) -> Notifications:
    return Notifications.model_validate({
        "review_url": "https://cedargate.example.test",
        "channels": {"ops-hook": {"type": "webhook", "url": receiver.url, "secret_env": "CEDARGATE_HOOK_SECRET"}},
        "routes": [{"events": ["opened", "reminder", "escalated", "decided", "expired"], "channels": ["ops-hook"],
                    **routes}],
        "retry_initial": "1s", "retry_max": "1s",
    })


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


def open_request(workflow: OverrideWorkflow, *requirements: Requirement, path: str = "/v1/instances/i-1/stop",
                 justification: str = "instance is wedged", body: bytes = b'{"grace": 30}') -> Override:
    call = make_call("POST", f"http://127.0.0.1:9000{path}", body=body,
                     headers={"Content-Type": "application/json"})
    requirements = requirements or (MANAGER,)
    override, created = workflow.open(
        call, decision_id=str(uuid.uuid4()), escalation=Escalation(requirements, 1800),
        policies=[{"id": r.policy_id, "reason": None, "annotations": {"severity": "high"}} for r in requirements],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {}},
        revision="rev-1", justification=justification,
    )
    assert created
    assert workflow.recorder.flush()
    return override
