"""Approve with changes, in the core: which values of a call are editable, checking a change, the
changed call, the MCP result marked; and the workflow taking (or refusing) an approval with changes on
a real core (the bundled policies, real cedarpy, a SQLite record)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.calls.mapping import Call
from proxy.cedar.manifest import load_manifest
from proxy.oversight.changes import (
    ChangeError,
    apply_changes,
    changed_body,
    check_changes,
    editable_fields,
    mark_changed,
    value_from_text,
)
from proxy.oversight.overrides import OverrideError, OverrideStatus
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential

POLICIES = Path(__file__).resolve().parents[3] / "policies"
REFUND = ("api.payments.example", "POST", "/v1/refunds/o-2")
TOOL_CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
             "params": {"name": "merge_pull_request", "arguments": {"repo": "acme/app", "number": 12,
                                                                     "squash": True, "labels": ["x"]}}}


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(POLICIES)


def refund_body(amount: object = 900, **more: object) -> bytes:
    return json.dumps({"amount": amount, "currency": "EUR", **more}).encode()


def test_a_manifest_route_s_body_fields_are_editable_its_path_fields_are_not(manifest):
    fields = editable_fields(manifest, *REFUND, refund_body())
    assert [f.as_dict() for f in fields] == [{"name": "amount", "type": "Decimal", "value": 900},
                                             {"name": "currency", "type": "String", "value": "EUR"}]


def test_an_mcp_tool_call_s_scalar_arguments_are_editable_typed_as_declared(manifest):
    fields = editable_fields(manifest, "mcp.github.example", "POST", "/mcp", json.dumps(TOOL_CALL).encode())
    assert [f.as_dict() for f in fields] == [
        {"name": "repo", "type": "String", "value": "acme/app"}, {"name": "number", "type": "Long", "value": 12},
        {"name": "squash", "type": "Bool", "value": True}]  # a list is not a typed value: not editable


@pytest.mark.parametrize("host, method, path, body", [
    ("api.payments.example", "POST", "/v1/refunds/o-2", b"not json"),
    ("api.payments.example", "GET", "/v1/refunds/o-2", b""),
    ("elsewhere.example", "POST", "/v1/refunds/o-2", b'{"amount": 900}'),
    ("mcp.github.example", "POST", "/mcp", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}'),
])
def test_a_call_without_typed_body_values_has_nothing_editable(manifest, host, method, path, body):
    assert editable_fields(manifest, host, method, path, body) == []


@pytest.mark.parametrize("changes, field, message", [
    ({"order_id": "o-3"}, "order_id", "not an editable field"),
    ({"amount": "50"}, "amount", "not the text '50'"),
    ({"amount": 50.12345}, "amount", "not a decimal"),
    ({"amount": True}, "amount", "a boolean"),
    ({"amount": None}, "amount", "not null"),
    ({"currency": 5}, "currency", "not a string"),
])
def test_a_change_to_an_unknown_field_or_of_the_wrong_type_is_refused_naming_it(manifest, changes, field,
                                                                                message):
    with pytest.raises(ChangeError) as refused:
        check_changes(editable_fields(manifest, *REFUND, refund_body()), changes)
    assert refused.value.errors[0]["field"] == field and message in refused.value.errors[0]["message"]


def test_a_long_takes_a_whole_number_only(manifest):
    fields = editable_fields(manifest, "mcp.github.example", "POST", "/mcp", json.dumps(TOOL_CALL).encode())
    assert check_changes(fields, {"number": 13, "squash": False}) == {"number": 13, "squash": False}
    with pytest.raises(ChangeError, match="whole number"):
        check_changes(fields, {"number": 13.0})


def test_the_changed_body_has_the_new_value_and_everything_else_as_sent(manifest):
    body = refund_body(900, note="ticket 5")
    fields = editable_fields(manifest, *REFUND, body)
    assert json.loads(changed_body(body, fields, {"amount": 50})) == {"amount": 50, "currency": "EUR",
                                                                     "note": "ticket 5"}
    call = Call(agent="billing-bot", method="POST", scheme="https", host="api.payments.example", port=443,
                path="/v1/refunds/o-2", headers={"Content-Type": "application/json",
                                                 "Content-Length": str(len(body))}, body=body)
    changed = apply_changes(call, fields, {"amount": 50.5})
    assert json.loads(changed.body)["amount"] == 50.5
    assert changed.headers["Content-Length"] == str(len(changed.body)) != str(len(body))


def test_the_changed_tool_call_changes_only_its_arguments(manifest):
    body = json.dumps(TOOL_CALL).encode()
    fields = editable_fields(manifest, "mcp.github.example", "POST", "/mcp", body)
    changed = json.loads(changed_body(body, fields, {"repo": "acme/other"}))
    assert changed == {**TOOL_CALL, "params": {**TOOL_CALL["params"],
                                               "arguments": {**TOOL_CALL["params"]["arguments"], "repo": "acme/other"}}}


def test_the_result_answering_the_changed_message_is_marked_others_are_not():
    answer = [{"jsonrpc": "2.0", "id": 7, "result": {"content": [], "_meta": {"kept": 1}}},
              {"jsonrpc": "2.0", "id": "7", "result": {"content": []}},
              {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}]
    marked = mark_changed(answer, {"7": {"amount": 50}})
    assert marked is not None
    assert marked[0]["result"]["_meta"] == {"kept": 1, "cedargate/changes": {"amount": 50}}
    assert "_meta" not in marked[1]["result"]  # the id "7" (a string) is another request's
    assert mark_changed({"jsonrpc": "2.0", "id": 8, "result": {}}, {"7": {"amount": 50}}) is None


@pytest.mark.parametrize("text, kind, value", [
    ("50", "Decimal", 50), ("50.25", "Decimal", 50.25), ("50", "Long", 50), ("50", "String", "50"),
    ("true", "Bool", True), ("lots", "Decimal", "lots"), ("12", None, 12), ("x", None, "x"),
])
def test_a_change_typed_at_a_terminal_takes_its_field_s_type(text, kind, value):
    assert value_from_text(text, kind) == value and type(value_from_text(text, kind)) is type(value)


# --- the workflow, on a real core ---------------------------------------------------------------

FINANCE = {"fay": ("finance",), "fred": ("finance",)}


@pytest.fixture
def runtime_settings():
    return {"approvers": {name: ApproverCredential(token_sha256="0" * 64, roles=roles)
                          for name, roles in FINANCE.items()}}


@pytest.fixture
def policy_dir(policy_dir: Path) -> Path:
    # A hard ceiling beside the bundled escalating limit: no approver can release a refund over it.
    (policy_dir / "ceiling.cedar").write_text(
        '@id("refund-ceiling")\n@reason("Refunds over 10000 are never made by an agent.")\n'
        'forbid (principal, action == Action::"process_refund", resource)\n'
        'when { context.amount.greaterThan(decimal("10000.0")) };\n')
    return policy_dir


def refund_call(amount: object = 900) -> Call:
    body = refund_body(amount)
    return Call(agent="billing-bot", method="POST", scheme="https", host="api.payments.example", port=443,
                path="/v1/refunds/o-2", headers={"Content-Type": "application/json",
                                                 "Content-Length": str(len(body))}, body=body)


def escalated_refund(runtime: Runtime, requirement_approvals: int = 1) -> str:
    verdict = runtime.gate.decide(refund_call())
    assert verdict.escalation is not None
    if requirement_approvals != 1:  # as a policy saying @approvals("2") would
        escalation = replace(verdict.escalation, requirements=tuple(
            replace(r, count=requirement_approvals) for r in verdict.escalation.requirements))
        verdict = replace(verdict, escalation=escalation)
    resolution = asyncio.run(runtime.oversight.resolve(verdict, 0, "customer asked", client_alive=lambda: True))
    assert resolution.override_id is not None
    return resolution.override_id


def audit_payloads(runtime: Runtime, override_id: str) -> dict[str, dict]:
    assert runtime.recorder.flush(10)
    with sqlite3.connect(runtime.settings.state_dir / "cedargate.db") as con:
        rows = con.execute("SELECT kind, payload FROM audit_log WHERE override_id = ? ORDER BY seq", (override_id,))
        return {kind: json.loads(payload) for kind, payload in rows}


def test_an_approval_with_changes_grants_the_changed_call_and_the_record_says_so(runtime: Runtime):
    override_id = escalated_refund(runtime)
    override, decided = runtime.workflow.vote(override_id, "fay", frozenset({"finance"}), "approve",
                                              "half now, half after the return", {"amount": 400})
    assert decided and override.status == OverrideStatus.GRANTED.value
    assert json.loads(override.changes or "null") == {"amount": 400}
    payloads = audit_payloads(runtime, override_id)
    assert payloads["approval"]["changes"] == payloads["grant"]["changes"] == {"amount": 400}


def test_an_unknown_field_or_a_wrong_type_is_422_and_nothing_is_recorded(runtime: Runtime):
    override_id = escalated_refund(runtime)
    for changes in ({"order_id": "o-9"}, {"amount": "400"}):
        with pytest.raises(OverrideError) as refused:
            runtime.workflow.vote(override_id, "fay", frozenset({"finance"}), "approve", "ok", changes)
        assert refused.value.status == 422
        assert refused.value.more["errors"][0]["field"] == next(iter(changes))
    assert runtime.overrides.get(override_id).status == OverrideStatus.PENDING.value  # type: ignore[union-attr]
    assert "approval" not in audit_payloads(runtime, override_id)


def test_a_change_the_policies_refuse_is_409_naming_the_policy(runtime: Runtime):
    override_id = escalated_refund(runtime)
    with pytest.raises(OverrideError) as refused:
        runtime.workflow.vote(override_id, "fay", frozenset({"finance"}), "approve", "more", {"amount": 20000})
    assert refused.value.status == 409 and refused.value.more["policies"] == ["refund-ceiling"]
    assert "refund-ceiling" in refused.value.detail
    # Still above the escalating limit is what the request asks approval for: taken.
    override, decided = runtime.workflow.vote(override_id, "fay", frozenset({"finance"}), "approve", "ok",
                                              {"amount": 800})
    assert decided and json.loads(override.changes or "null") == {"amount": 800}


def test_several_approvers_must_agree_on_the_changes(runtime: Runtime):
    override_id = escalated_refund(runtime, requirement_approvals=2)
    override, decided = runtime.workflow.vote(override_id, "fay", frozenset({"finance"}), "approve", "ok",
                                              {"amount": 400})
    assert not decided
    for other in ({"amount": 300}, None):
        with pytest.raises(OverrideError) as refused:
            runtime.workflow.vote(override_id, "fred", frozenset({"finance"}), "approve", "ok", other)
        assert refused.value.status == 409 and refused.value.more["changes"] == {"amount": 400}
        assert "fay approved" in refused.value.detail
    override, decided = runtime.workflow.vote(override_id, "fred", frozenset({"finance"}), "approve", "ok",
                                              {"amount": 400.0})
    assert decided and override.status == OverrideStatus.GRANTED.value


def test_an_approval_as_sent_first_binds_the_others_to_no_changes(runtime: Runtime):
    override_id = escalated_refund(runtime, requirement_approvals=2)
    runtime.workflow.vote(override_id, "fay", frozenset({"finance"}), "approve", "ok")
    with pytest.raises(OverrideError, match="as sent, without changes") as refused:
        runtime.workflow.vote(override_id, "fred", frozenset({"finance"}), "approve", "ok", {"amount": 400})
    assert refused.value.status == 409
    override, decided = runtime.workflow.vote(override_id, "fred", frozenset({"finance"}), "approve", "ok", {})
    assert decided and override.changes is None


def test_a_denial_cannot_bring_changes(runtime: Runtime):
    override_id = escalated_refund(runtime)
    with pytest.raises(OverrideError) as refused:
        runtime.workflow.vote(override_id, "fay", frozenset({"finance"}), "deny", "no", {"amount": 1})
    assert refused.value.status == 422


# --- release: the changed call is what goes, decided again ---------------------------------------

def release(runtime: Runtime, call: Call):
    return asyncio.run(runtime.oversight.resolve(runtime.gate.decide(call), 5, None, client_alive=lambda: True))


def test_the_release_carries_the_changed_body_and_the_record_says_what_changed(runtime: Runtime):
    override_id = escalated_refund(runtime)
    runtime.workflow.vote(override_id, "fay", frozenset({"finance"}), "approve", "ok", {"amount": 400})
    resolution = release(runtime, refund_call())  # the agent's call as it sent it
    assert resolution.release and resolution.override_id == override_id
    assert resolution.changes == {"amount": 400}
    assert resolution.body is not None and json.loads(resolution.body) == {"amount": 400, "currency": "EUR"}
    assert audit_payloads(runtime, override_id)["release"]["changes"] == {"amount": 400}
    assert runtime.overrides.get(override_id).status == OverrideStatus.RELEASED.value  # type: ignore[union-attr]


def test_the_release_s_own_check_of_the_changed_call_is_the_one_that_counts(runtime: Runtime, policy_dir: Path):
    override_id = escalated_refund(runtime)
    runtime.workflow.vote(override_id, "fay", frozenset({"finance"}), "approve", "ok", {"amount": 400})
    # Between approval and release a policy comes to refuse the changed amount (not the one sent).
    (policy_dir / "band.cedar").write_text(
        '@id("no-mid-refunds")\n@reason("Refunds between 300 and 600 go through the shop.")\n'
        'forbid (principal, action == Action::"process_refund", resource)\n'
        'when { context.amount.greaterThan(decimal("300.0")) && context.amount.lessThan(decimal("600.0")) };\n')
    assert runtime.engine.reload()
    resolution = release(runtime, refund_call())
    assert not resolution.release and resolution.body is None
    body = resolution.verdict.problem_body()
    assert body["type"] == "urn:cedargate:problem:override-release-refused"
    assert "go through the shop" in body["detail"]
    assert runtime.overrides.get(override_id).status == OverrideStatus.RELEASE_REFUSED.value  # type: ignore[union-attr]


def test_an_approval_without_changes_releases_the_call_as_sent(runtime: Runtime):
    override_id = escalated_refund(runtime)
    runtime.workflow.vote(override_id, "fay", frozenset({"finance"}), "approve", "ok")
    resolution = release(runtime, refund_call())
    assert resolution.release and resolution.changes is None and resolution.body is None
    assert "changes" not in audit_payloads(runtime, override_id)["release"]
