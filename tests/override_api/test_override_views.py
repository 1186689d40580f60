"""Who sees which override request through the API: approvers only the ones their roles can decide,
auditors all of them (without a vote they do not otherwise have); and what a reviewer is shown of a
call's query secrets."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from override_api.main import create_app
from proxy.calls.mapping import Call
from proxy.cedar.escalation import Escalation, Requirement
from proxy.oversight.overrides import Override
from proxy.runtime import Runtime
from tests.support.approvers import bearer, credentials

MANAGER = Requirement("protect-production-instances", ("engineering-manager",), 1)
TWO_PERSON = Requirement("no-volume-deletion", ("security", "lead-engineer"), 2)
ROLES = {"erin": ("engineering-manager",), "sam": ("security",), "audra": ("auditor",),
         "ada": ("auditor", "engineering-manager")}


@pytest.fixture
def runtime_settings() -> dict[str, Any]:
    return {"approvers": credentials(ROLES)}


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime)) as test_client:
        yield test_client


def open_request(runtime: Runtime, path: str, requirement: Requirement, query: str = "") -> Override:
    call = Call(agent="ops-bot", method="POST", scheme="http", host="127.0.0.1", port=9000, path=path,
                query=query)
    override, _ = runtime.overrides.open_or_attach(
        call, decision_id=str(uuid.uuid4()), escalation=Escalation((requirement,), 1800),
        policies=[{"id": requirement.policy_id, "reason": None, "annotations": {}}],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {"path": path, "query": query}},
        revision="rev-1", justification=None,
    )
    return override


def test_an_approver_sees_only_the_requests_their_roles_can_decide(runtime: Runtime, client: TestClient):
    stop = open_request(runtime, "/v1/instances/i-1/stop", MANAGER)
    volume = open_request(runtime, "/v1/volumes/vol-1", TWO_PERSON)

    assert [o["id"] for o in client.get("/overrides", headers=bearer("erin")).json()] == [stop.id]
    assert [o["id"] for o in client.get("/overrides", headers=bearer("sam")).json()] == [volume.id]
    assert client.get(f"/overrides/{stop.id}", headers=bearer("erin")).status_code == 200
    # Another role's request is answered as if it did not exist.
    hidden = client.get(f"/overrides/{volume.id}", headers=bearer("erin"))
    missing = client.get(f"/overrides/{uuid.uuid4()}", headers=bearer("erin"))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["detail"] == f"no override request {volume.id}"


def test_an_auditor_sees_every_request_but_votes_only_with_a_needed_role(runtime: Runtime,
                                                                          client: TestClient):
    stop = open_request(runtime, "/v1/instances/i-1/stop", MANAGER)
    volume = open_request(runtime, "/v1/volumes/vol-1", TWO_PERSON)

    for auditor in ("audra", "ada"):
        listed = client.get("/overrides", headers=bearer(auditor)).json()
        assert {o["id"] for o in listed} == {stop.id, volume.id}
        assert client.get(f"/overrides/{volume.id}", headers=bearer(auditor)).status_code == 200
    refused = client.post(f"/overrides/{stop.id}/approve", headers=bearer("audra"),
                          json={"reason": "looks fine"})
    assert refused.status_code == 403 and "holds none of the roles" in refused.json()["detail"]
    granted = client.post(f"/overrides/{stop.id}/approve", headers=bearer("ada"), json={"reason": "looks fine"})
    assert granted.status_code == 200 and granted.json()["status"] == "granted"


def test_a_reviewer_sees_a_query_secret_redacted(runtime: Runtime, client: TestClient):
    override = open_request(runtime, "/v1/instances/i-1/stop", MANAGER, query="sig=s3cr3t-v4lue&zone=a")
    shown = client.get(f"/overrides/{override.id}", headers=bearer("erin")).json()
    assert shown["url"] == "http://127.0.0.1:9000/v1/instances/i-1/stop?sig=[redacted]&zone=a"
    assert shown["cedar_request"]["context"]["query"] == "sig=[redacted]&zone=a"
    assert "s3cr3t-v4lue" not in client.get("/overrides", headers=bearer("erin")).text
