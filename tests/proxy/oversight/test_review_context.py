"""What surrounds one override request for its reviewer, read from a real record and override store on
SQLite and PostgreSQL: the agent's statements, its recent calls in the session with their outcomes, how
the same policy decided the same tool before, and whether the escalating revision is still live."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from proxy_support import make_call

from proxy.cedar.escalation import Escalation, Requirement
from proxy.cedar.policy import load_bundle
from proxy.oversight.overrides import Override
from proxy.oversight.review_context import RECENT_CALLS, review_context
from proxy.oversight.workflow import OverrideWorkflow

SECURITY = Requirement("no-repository-deletion", ("security",), 1)
SAM = frozenset({"security"})
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def delete_repository(workflow: OverrideWorkflow, repo: str, *, session: str | None = "s-1",
                      revision: str = "rev-1", agent: str = "ops-bot") -> Override:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "delete_repository", "arguments": {"repo": repo}}}).encode()
    told = {"confidence": {"__extn": {"fn": "decimal", "arg": "0.85"}}}
    if session is not None:
        told["session"] = session
    override, created = workflow.open(
        make_call("POST", "http://mcp.github.example/mcp", agent=agent, body=body),
        decision_id=str(uuid.uuid4()), escalation=Escalation((SECURITY,), 1800),
        policies=[{"id": SECURITY.policy_id, "reason": "Deleting a repository loses its history for good.",
                   "annotations": {"severity": "critical"}}],
        cedar_request={"principal": f'Agent::"{agent}"', "action": 'Action::"call_tool"',
                       "resource": 'Tool::"github/delete_repository"',
                       "context": {"server": "github", "tool": "delete_repository", "arguments": {"repo": repo},
                                   "agent": told}},
        revision=revision, justification=f"{repo} was archived", binding=body,
    )
    assert created
    return override


def record_call(workflow: OverrideWorkflow, at: datetime, *, session: str | None, tool: str | None = None,
                decision: str = "allow", status: int | None = 200, agent: str = "ops-bot",
                decision_id: str | None = None) -> str:
    decision_id = decision_id or str(uuid.uuid4())
    workflow.recorder.record({
        "decision_id": decision_id, "at": at, "agent": agent, "method": "POST", "scheme": "http",
        "host": "mcp.github.example", "port": 80, "path": "/mcp",
        "action": 'Action::"call_tool"' if tool else 'Action::"mcp_rpc"', "resource": 'McpServer::"github"',
        "decision": decision, "determining_policies": json.dumps(["github-tools"]), "errors": "[]",
        "policy_revision": "rev-1", "upstream_status": status, "duration_ms": 1.0, "session": session,
        "tool": tool,
    })
    return decision_id


def test_the_agent_s_statements_and_its_recent_calls_in_the_session(workflow: OverrideWorkflow, policy_dir: Path):
    override = delete_repository(workflow, "acme/old-site")
    for i in range(RECENT_CALLS + 5):  # more than are shown: the newest are
        record_call(workflow, T0 + timedelta(seconds=i), session="s-1", tool="search_issues")
    record_call(workflow, T0 + timedelta(hours=1), session="s-1", tool="delete_repository", decision="escalate",
                status=None, decision_id=override.decision_id)
    record_call(workflow, T0 + timedelta(hours=2), session="s-2", tool="create_issue")  # another session
    record_call(workflow, T0 + timedelta(hours=3), session="s-1", agent="other-bot")  # another agent
    assert workflow.recorder.flush()

    shown = review_context(override, store=workflow.store, bundle=load_bundle(policy_dir), roles=SAM)

    assert shown["agent"] == {"id": "ops-bot", "justification": "acme/old-site was archived",
                              "confidence": "0.85", "session": "s-1"}
    recent = shown["recent_calls"]
    assert (recent["scope"], recent["session"], len(recent["calls"])) == ("session", "s-1", RECENT_CALLS)
    newest = recent["calls"][0]
    assert (newest["decision_id"], newest["tool"], newest["decision"], newest["this_request"]) == (
        override.decision_id, "delete_repository", "escalate", True)
    assert [c["upstream_status"] for c in recent["calls"][1:3]] == [200, 200]
    assert {c["tool"] for c in recent["calls"][1:]} == {"search_issues"}
    assert not any(c["this_request"] for c in recent["calls"][1:])


def test_without_a_session_the_agent_s_latest_calls_are_shown(workflow: OverrideWorkflow, policy_dir: Path):
    override = delete_repository(workflow, "acme/old-site", session=None)
    record_call(workflow, T0, session=None)
    record_call(workflow, T0 + timedelta(seconds=1), session="s-9")
    assert workflow.recorder.flush()
    recent = review_context(override, store=workflow.store, bundle=load_bundle(policy_dir), roles=SAM)["recent_calls"]
    assert (recent["scope"], recent["session"], len(recent["calls"])) == ("agent", None, 2)


def test_similar_requests_are_the_decided_ones_of_the_same_policy_and_tool(workflow: OverrideWorkflow,
                                                                          policy_dir: Path):
    denied = delete_repository(workflow, "acme/one")
    workflow.vote(denied.id, "sam", SAM, "deny", "still has open issues")
    granted = delete_repository(workflow, "acme/two")
    workflow.vote(granted.id, "sam", SAM, "approve", "archived for years")
    delete_repository(workflow, "acme/three")  # undecided: not history yet
    current = delete_repository(workflow, "acme/four")

    similar = review_context(current, store=workflow.store, bundle=load_bundle(policy_dir), roles=SAM)["similar"]

    assert (similar["policy"], similar["tool"]) == ("no-repository-deletion", "delete_repository")
    assert similar["outcomes"] == {"denied": 1, "granted": 1}
    assert [(r["id"], r["status"], r["decided_reason"], r["key_arguments"]) for r in similar["requests"]] == [
        (granted.id, "granted", "archived for years", {"repo": "acme/two"}),
        (denied.id, "denied", "still has open issues", {"repo": "acme/one"}),
    ]
    assert [(v["approver"], v["verdict"]) for v in similar["requests"][1]["votes"]] == [("sam", "deny")]
    # Someone who could decide none of them is shown none of them.
    assert review_context(current, store=workflow.store, bundle=load_bundle(policy_dir),
                          roles=frozenset({"finance"}))["similar"]["requests"] == []


def test_the_policy_revision_says_whether_it_is_still_live(workflow: OverrideWorkflow, policy_dir: Path):
    bundle = load_bundle(policy_dir)
    live = delete_repository(workflow, "acme/live", revision=bundle.revision)
    old = delete_repository(workflow, "acme/old", revision="an-older-revision")

    state = review_context(live, store=workflow.store, bundle=bundle, roles=SAM)["policy"]
    assert (state["revision"], state["live_revision"], state["is_live"]) == (bundle.revision, bundle.revision, True)
    [policy] = state["policies"]
    assert (policy["id"], policy["in_live_revision"]) == ("no-repository-deletion", True)
    assert policy["live_annotations"]["escalate"] == "security"

    # The policy file edited since: the request was escalated under another revision.
    (policy_dir / "github.cedar").write_text((policy_dir / "github.cedar").read_text().replace(
        '@id("no-repository-deletion")', '@id("repository-deletion-reviewed")'))
    changed = load_bundle(policy_dir)
    state = review_context(old, store=workflow.store, bundle=changed, roles=SAM)["policy"]
    assert (state["is_live"], state["policies"][0]["in_live_revision"], state["policies"][0]["live_annotations"]) == (
        False, False, None)
