"""What the notification tests share: the approvers they know, a request opened as an escalated call
opens one, and a `notifications:` section routing every event to one signing webhook."""

from __future__ import annotations

import uuid
from typing import Any

from proxy_support import make_call

from proxy.cedar.escalation import Escalation, Requirement
from proxy.oversight.overrides import Override
from proxy.oversight.workflow import OverrideWorkflow
from proxy.settings.config import ApproverCredential
from proxy.settings.notifications import Notifications
from tests.support.receiver import Receiver

SECRET = "whsec-test-5a1f"
MANAGER = Requirement("protect-production-instances", ("engineering-manager",), 1)
SECURITY = Requirement("no-volume-deletion", ("security",), 1)
APPROVERS = {
    "erin": ApproverCredential(token_env="E", roles=("engineering-manager",), email="erin@example.test"),
    "max": ApproverCredential(token_env="M", roles=("engineering-manager",)),
    "sam": ApproverCredential(token_env="S", roles=("security",), email="sam@example.test"),
}


def webhook_config(receiver: Receiver, **routes: Any) -> Notifications:
    return Notifications.model_validate({
        "review_url": "https://cedargate.example.test",
        "channels": {"ops-hook": {"type": "webhook", "url": receiver.url, "secret_env": "CEDARGATE_HOOK_SECRET"}},
        "routes": [{"events": ["opened", "reminder", "escalated", "decided", "expired"], "channels": ["ops-hook"],
                    **routes}],
        "retry_initial": "1s", "retry_max": "1s",
    })


def open_request(workflow: OverrideWorkflow, *requirements: Requirement, path: str = "/v1/instances/i-1/stop",
                 justification: str = "instance is wedged", body: bytes = b'{"grace": 30}',
                 expires_in: int = 1800, context: dict[str, Any] | None = None) -> Override:
    """An override request opened as the gate opens one; `context` is its Cedar request's (a manifest
    route's typed fields there become the notice's key arguments)."""
    call = make_call("POST", f"http://127.0.0.1:9000{path}", body=body,
                     headers={"Content-Type": "application/json"})
    requirements = requirements or (MANAGER,)
    override, created = workflow.open(
        call, decision_id=str(uuid.uuid4()), escalation=Escalation(requirements, expires_in),
        policies=[{"id": r.policy_id, "reason": None, "annotations": {"severity": "high"}} for r in requirements],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": context or {}},
        revision="rev-1", justification=justification,
    )
    assert created
    assert workflow.recorder.flush()
    return override
