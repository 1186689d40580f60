"""Who sees which override request through the API: approvers only the ones their roles can decide,
auditors all of them (without a vote they do not otherwise have); and what a reviewer is shown of a
call's query secrets."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from override_api.main import create_app
from proxy.calls.mapping import Call
from proxy.cedar.escalation import Escalation, Requirement, Tier
from proxy.cli.override_views import moment
from proxy.oversight.overrides import Override
from proxy.runtime import Runtime
from tests.support.approvers import bearer, credentials

MANAGER = Requirement("protect-production-instances", ("engineering-manager",), 1)
TWO_PERSON = Requirement("no-volume-deletion", ("security", "lead-engineer"), 2)
ROLES = {"erin": ("engineering-manager",), "sam": ("security",), "audra": ("auditor",),
         "ada": ("auditor", "engineering-manager"), "olga": ("on-call",)}


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


ON_CALL_CHAIN = Requirement("protect-staging-instances", ("on-call",), 1, (Tier(600, ("engineering-manager",)),))


def test_a_request_shows_its_chain_and_a_later_tier_sees_it_once_reached(runtime: Runtime, client: TestClient):
    call = Call(agent="ops-bot", method="POST", scheme="https", host="cloud.staging.example", port=443,
                path="/v1/instances/i-9/stop")
    override, _ = runtime.workflow.open(
        call, decision_id=str(uuid.uuid4()), escalation=Escalation((ON_CALL_CHAIN,), 3600, 300),
        policies=[{"id": ON_CALL_CHAIN.policy_id, "reason": None, "annotations": {}}],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"cloud.staging.example"', "context": {}},
        revision="rev-1", justification=None)

    [listed] = client.get("/overrides", headers=bearer("olga")).json()
    chain = listed["chain"]
    assert [(t["tier"], t["roles"], t["after_seconds"], t["reached"]) for t in chain["tiers"]] == [
        (1, ["on-call"], 0, True), (2, ["engineering-manager"], 600, False)]
    assert (chain["tier"], chain["tier_count"], chain["next_step"], chain["remind_every"]) == (1, 2, "tier 2", 300)
    assert chain["primary_reviewer"] == "olga"
    opened = moment(listed["created_at"])  # an API time without an offset is UTC
    assert opened is not None and moment(chain["next_step_at"]) == opened + timedelta(minutes=10)
    assert client.get(f"/overrides/{override.id}", headers=bearer("olga")).json()["chain"] == chain

    # The manager's tier is not reached: the request is not theirs to see yet.
    assert client.get("/overrides", headers=bearer("erin")).json() == []
    assert client.get(f"/overrides/{override.id}", headers=bearer("erin")).status_code == 404
    with Session(runtime.overrides.engine) as session:  # eleven minutes later
        row = session.get(Override, override.id)
        assert row is not None
        row.created_at -= timedelta(minutes=11)
        session.add(row)
        session.commit()
    shown = client.get(f"/overrides/{override.id}", headers=bearer("erin"))
    assert shown.status_code == 200
    assert (shown.json()["chain"]["tier"], shown.json()["chain"]["next_step"]) == (2, "expiry")
    assert "engineering-manager" in shown.json()["roles_needed"]


def test_the_api_docs_declare_the_chain(client: TestClient):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"ChainPublic", "ChainTierPublic"} <= set(schemas)
    assert set(schemas["ChainPublic"]["properties"]) == {"tiers", "tier", "tier_count", "remind_every", "next_step",
                                                        "next_step_at", "primary_reviewer"}
