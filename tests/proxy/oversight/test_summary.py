"""The summary a reviewer reads of each request at a glance, worked out from the request's row alone."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from proxy.cedar.escalation import Requirement
from proxy.oversight.overrides import Override, Vote
from proxy.oversight.summary import MAX_ARGUMENTS, MAX_TEXT, key_arguments, still_needed, summarize

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DECIMAL_900 = {"__extn": {"fn": "decimal", "arg": "900.0"}}


def request(*, action: str = 'Action::"process_refund"', context: dict | None = None, body: bytes = b"",
            policies: list | None = None, requirements: list[Requirement] = (), status: str = "pending",
            expires_in: float = 90.5) -> Override:
    return Override(
        id="o-1", fingerprint="f", status=status, agent="billing-bot", method="POST",
        url="https://api.payments.example/v1/refunds/A-17", host="api.payments.example", path="/v1/refunds/A-17",
        action=action, resource='Host::"api.payments.example"', body=body, body_sha256="",
        cedar_request=json.dumps({"action": action, "context": context or {}}),
        policies=json.dumps(policies if policies is not None else [{"id": "p", "reason": None, "annotations": {}}]),
        requirements=json.dumps([r.as_dict() for r in requirements]), policy_revision="r", decision_id="d",
        created_at=NOW - timedelta(seconds=30), expires_at=NOW + timedelta(seconds=expires_in),
    )


def vote(approver: str, roles: tuple[str, ...], verdict: str = "approve") -> Vote:
    return Vote(approver, frozenset(roles), verdict, f"{approver}'s reason", NOW)


REFUND_CONTEXT = {"scheme": "https", "host": "api.payments.example", "port": 443, "method": "POST",
                  "path": "/v1/refunds/A-17", "query": "", "headers": {}, "body": {"amount": 900},
                  "severity": "high", "reversible": False,
                  "order_id": "A-17", "amount": DECIMAL_900, "currency": "EUR"}


def test_a_manifest_route_shows_its_fields_and_its_classification():
    summary = summarize(request(context=REFUND_CONTEXT), [], NOW)
    assert summary.tool is None
    # The route's typed fields, not what every call carries (path, headers, body...).
    assert summary.key_arguments == {"order_id": "A-17", "amount": "900.0", "currency": "EUR"}
    assert (summary.severity, summary.reversible) == ("high", False)
    assert summary.seconds_left == 91  # rounded up: a request with 0.5 s left is not yet gone


def test_an_mcp_tool_call_shows_the_tool_and_its_arguments_as_sent():
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "delete_repository", "arguments": {"repo": "acme/old", "force": True, "tags": ["a", "b"]}}})
    context = {"server": "github", "tool": "delete_repository", "arguments": {"repo": "acme/old"},
               "rpc_kind": "request", "rpc_method": "tools/call", "severity": "critical", "reversible": False}
    summary = summarize(request(action='Action::"call_tool"', context=context, body=body.encode()), [], NOW)
    assert summary.tool == "delete_repository"
    assert summary.key_arguments == {"repo": "acme/old", "force": "true", "tags": '["a","b"]'}
    assert (summary.severity, summary.reversible) == ("critical", False)


def test_policy_annotations_outrank_the_manifest_and_the_gravest_wins():
    policies = [{"id": "a", "reason": None, "annotations": {"severity": "medium", "reversible": "true"}},
                {"id": "b", "reason": None, "annotations": {"severity": "critical"}}]
    summary = summarize(request(context=REFUND_CONTEXT, policies=policies), [], NOW)
    assert (summary.severity, summary.reversible) == ("critical", True)
    policies[1]["annotations"]["reversible"] = "false"
    assert summarize(request(context=REFUND_CONTEXT, policies=policies), [], NOW).reversible is False


def test_an_unclassified_call_says_nothing_of_its_severity():
    """A plain HTTP call under no manifest, and an MCP tool the manifest does not list, have no severity:
    null, not a guess."""
    assert (summarize(request(action='Action::"post"', context={"path": "/x"}), [], NOW).severity) is None
    unlisted = {"tool": "t", "severity": "unclassified", "reversible": False}
    summary = summarize(request(context=unlisted), [], NOW)
    assert (summary.severity, summary.reversible) == (None, None)


def test_key_arguments_are_capped_in_number_and_length_and_made_printable():
    many = {f"field{i}": "x" * 500 for i in range(20)}
    shown = key_arguments({"\u202enote": "pay\x1b[2K", **many})
    assert len(shown) == MAX_ARGUMENTS
    assert shown["\\u202enote"] == "pay\\x1b[2K"
    assert all(len(name) <= MAX_TEXT and len(value) <= MAX_TEXT for name, value in shown.items())
    assert shown["field0"].endswith("…")
    assert key_arguments(["not", "a", "mapping"]) == {}


TWO_PERSON = Requirement("no-volume-deletion", ("security", "lead-engineer"), 2)
FINANCE_TWICE = Requirement("huge-refunds", ("finance",), 2)


@pytest.mark.parametrize("requirements, votes, roles, count", [
    ((TWO_PERSON,), [], ["lead-engineer", "security"], 2),
    ((TWO_PERSON,), [vote("sam", ("security",))], ["lead-engineer"], 1),
    # One approver holding both roles covers one of them only: the rule wants two people.
    ((TWO_PERSON,), [vote("ada", ("security", "lead-engineer"))], ["lead-engineer", "security"], 1),
    ((FINANCE_TWICE,), [vote("fay", ("finance",))], ["finance"], 1),
    ((FINANCE_TWICE, TWO_PERSON), [vote("fay", ("finance",))], ["finance", "lead-engineer", "security"], 2),
    # A denial is no approval; the request is decided by it, but what approvals lack is unchanged.
    ((TWO_PERSON,), [vote("sam", ("security",), "deny")], ["lead-engineer", "security"], 2),
])
def test_roles_still_needed_follow_the_requirements_and_the_approvals_so_far(requirements, votes, roles, count):
    summary = summarize(request(requirements=list(requirements)), votes, NOW)
    assert (summary.roles_needed, summary.approvals_needed) == (roles, count)
    assert [v["approver"] for v in summary.votes] == [v.approver for v in votes]


def test_a_decided_request_needs_nobody_and_has_no_time_left():
    decided = request(requirements=[TWO_PERSON], status="denied", expires_in=-5)
    summary = summarize(decided, [vote("sam", ("security",), "deny")], NOW)
    assert (summary.roles_needed, summary.approvals_needed, summary.seconds_left) == ([], 0, None)
    assert summary.votes == [{"approver": "sam", "roles": ["security"], "verdict": "deny",
                              "reason": "sam's reason", "at": NOW}]
    overdue = summarize(request(expires_in=-5), [], NOW)
    assert overdue.seconds_left == 0  # past its time, not yet swept by the expiry job


def test_still_needed_when_met_is_nothing():
    assert still_needed([TWO_PERSON], {"sam": frozenset({"security"}), "lee": frozenset({"lead-engineer"})}) == (
        [], 0)
