"""Approve with changes through the API, as a reviewer uses it: the request shows its editable fields,
an approval brings `changes`, and a change that cannot be taken is a problem+json saying why (422 for
a field the call lacks or a value of the wrong type, 409 when the policies refuse the changed call or
the approvers disagree). On a real core and a temporary SQLite record."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from proxy.calls.mapping import Call
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential
from tests.support.approvers import bearer, credentials

PROBLEM = "application/problem+json"
ROLES = {"fay": ("finance",), "fred": ("finance",), "erin": ("engineering-manager",)}


@pytest.fixture
def approvers() -> dict[str, ApproverCredential]:
    return credentials(ROLES)


@pytest.fixture
def policy_dir(policy_dir: Path) -> Path:
    (policy_dir / "ceiling.cedar").write_text(
        '@id("refund-ceiling")\n@reason("Refunds over 10000 are never made by an agent.")\n'
        'forbid (principal, action == Action::"process_refund", resource)\n'
        'when { context.amount.greaterThan(decimal("10000.0")) };\n')
    return policy_dir


def escalated_refund(runtime: Runtime, amount: int = 900, approvals: int = 1) -> str:
    body = json.dumps({"amount": amount, "currency": "EUR"}).encode()
    verdict = runtime.gate.decide(Call(
        agent="billing-bot", method="POST", scheme="https", host="api.payments.example", port=443,
        path="/v1/refunds/o-2", headers={"Content-Type": "application/json"}, body=body))
    assert verdict.escalation is not None
    if approvals != 1:
        verdict = replace(verdict, escalation=replace(verdict.escalation, requirements=tuple(
            replace(r, count=approvals) for r in verdict.escalation.requirements)))
    resolution = asyncio.run(runtime.oversight.resolve(verdict, 0, None, client_alive=lambda: True))
    assert resolution.override_id is not None
    return resolution.override_id


def approve(client: TestClient, override_id: str, who: str, changes: object = None):
    body: dict = {"reason": "agreed with the customer"}
    if changes is not None:
        body["changes"] = changes
    return client.post(f"/overrides/{override_id}/approve", json=body, headers=bearer(who))


def problem(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == f"urn:cedargate:problem:{kind}" and body["status"] == status
    return body


def test_a_request_shows_what_may_be_changed_and_an_approval_changes_it(runtime: Runtime, client: TestClient):
    override_id = escalated_refund(runtime)
    shown = client.get(f"/overrides/{override_id}", headers=bearer("fay")).json()
    assert shown["editable_fields"] == [{"name": "amount", "type": "Decimal", "value": 900},
                                        {"name": "currency", "type": "String", "value": "EUR"}]
    assert shown["changes"] is None
    approved = approve(client, override_id, "fay", {"amount": 450})
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "granted" and approved.json()["changes"] == {"amount": 450}
    assert client.get(f"/overrides/{override_id}", headers=bearer("fay")).json()["changes"] == {"amount": 450}


@pytest.mark.parametrize("changes, field", [({"order_id": "o-3"}, "order_id"), ({"amount": "450"}, "amount"),
                                            ({"currency": 1}, "currency")])
def test_an_unknown_field_or_a_wrong_type_is_422(runtime: Runtime, client: TestClient, changes, field):
    override_id = escalated_refund(runtime)
    body = problem(approve(client, override_id, "fay", changes), 422, "override-changes-invalid")
    assert [e["field"] for e in body["errors"]] == [field] and field in body["detail"]
    assert [f["name"] for f in body["editable_fields"]] == ["amount", "currency"]
    assert client.get(f"/overrides/{override_id}", headers=bearer("fay")).json()["status"] == "pending"


def test_changes_that_are_not_an_object_are_422(runtime: Runtime, client: TestClient):
    override_id = escalated_refund(runtime)
    response = approve(client, override_id, "fay", [["amount", 450]])
    assert response.status_code == 422 and "changes" in response.json()["detail"]


def test_a_changed_call_the_policies_refuse_is_409_naming_the_policy(runtime: Runtime, client: TestClient):
    override_id = escalated_refund(runtime)
    body = problem(approve(client, override_id, "fay", {"amount": 25000}), 409, "override-changes-refused")
    assert body["policies"] == ["refund-ceiling"] and "never made by an agent" in body["detail"]
    assert client.get(f"/overrides/{override_id}", headers=bearer("fay")).json()["votes"] == []


def test_approvers_who_disagree_on_the_changes_get_409(runtime: Runtime, client: TestClient):
    override_id = escalated_refund(runtime, approvals=2)
    assert approve(client, override_id, "fay", {"amount": 450}).json()["status"] == "pending"
    body = problem(approve(client, override_id, "fred", {"amount": 400}), 409, "override-changes-disagree")
    assert body["changes"] == {"amount": 450} and "fay" in body["detail"]
    problem(approve(client, override_id, "fred"), 409, "override-changes-disagree")
    agreed = approve(client, override_id, "fred", {"amount": 450})
    assert agreed.json()["status"] == "granted" and agreed.json()["changes"] == {"amount": 450}


def test_someone_who_may_not_vote_learns_nothing_of_the_changes(runtime: Runtime, client: TestClient):
    override_id = escalated_refund(runtime)
    response = approve(client, override_id, "erin", {"amount": 1})
    assert response.status_code == 403 and "none of the roles" in response.json()["detail"]


def test_a_call_without_editable_values_takes_no_changes(runtime: Runtime, client: TestClient):
    verdict = runtime.gate.decide(Call(agent="ops-bot", method="POST", scheme="http", host="127.0.0.1", port=9000,
                                       path="/v1/instances/i-1/stop"))
    resolution = asyncio.run(runtime.oversight.resolve(verdict, 0, None, client_alive=lambda: True))
    assert resolution.override_id is not None
    shown = client.get(f"/overrides/{resolution.override_id}", headers=bearer("erin")).json()
    assert shown["editable_fields"] == []
    body = problem(approve(client, resolution.override_id, "erin", {"force": True}), 422,
                   "override-changes-invalid")
    assert "editable: none" in body["detail"]
