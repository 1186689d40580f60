"""Policies on the time of a call and on an MCP server's own tool annotations, through the real proxy.

The time: cedargate runs on a clock the test sets (tests/support/fixed_clock.py: the real program, its
gate reading "now" from a file), with the bundled after-hours policy. The hints: the official MCP SDK's
server (tests/e2e/mcp_peers, `--annotated`) annotates its tools, one of them with a lie, and the SDK's
client lists and calls them through cedargate.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager

import httpx
import pytest
from e2e_support import start_cedargate, write_config
from test_mcp_flow import PEER_PYTHON, _start_server, run_agent

from tests.support.manifests import use_manifest
from tests.support.waiting import wait_until

# -- the time --------------------------------------------------------------------------------------------


@pytest.fixture
def staging_gate(tmp_path, policy_dir, upstream):
    """The bundled policies, with the loopback upstream as a staging host, on a clock the test sets."""
    entities = json.loads((policy_dir / "entities.json").read_text())
    for entity in entities:
        if entity["uid"] == {"type": "Host", "id": "127.0.0.1"}:
            entity["attrs"]["tags"] = ["staging"]
    (policy_dir / "entities.json").write_text(json.dumps(entities))
    clock = tmp_path / "clock"
    clock.write_text("2026-12-02T10:00:00+01:00")  # a Wednesday morning in Berlin
    config = write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream,
                          time_zone="Europe/Berlin")
    gate = start_cedargate(config, clock_file=clock)
    upstream.reset()
    yield gate, clock
    gate.stop()


def test_stopping_a_staging_instance_after_hours_waits_for_the_on_call_engineer(staging_gate, upstream):
    gate, clock = staging_gate
    url = f"http://127.0.0.1:{upstream.http_port}/v1/instances/i-7/stop"
    with httpx.Client(proxy=gate.proxy_url, timeout=30) as agent:
        in_hours = agent.post(url)
        clock.write_text("2026-12-02T20:00:00Z")  # 21:00 in Berlin
        after_hours = agent.post(url, headers={"Prefer": "respond-async"})
        clock.write_text("2026-12-05T11:00:00+01:00")  # a Saturday
        weekend = agent.post(url, headers={"Prefer": "respond-async"})
        clock.write_text("2026-12-07T08:00:00+01:00")  # Monday, 08:00: back in hours
        monday = agent.post(url)

    assert (in_hours.status_code, monday.status_code) == (200, 200)
    assert [c.path for c in upstream.calls] == ["/v1/instances/i-7/stop"] * 2
    for refused in (after_hours, weekend):
        problem = refused.json()
        assert refused.status_code == 403 and problem["type"] == "urn:cedargate:problem:override-pending"
        assert problem["required_roles"] == ["on-call"]
        assert [p["id"] for p in problem["policies"]] == ["staging-after-hours"]
    # The record says when each call was decided: the clock's time. (A forwarded call's row is journaled
    # before it goes and committed a few ms later: wait for the four.)
    rows = wait_until(lambda: len(found := _stops(gate)) >= 4 and found, "the four calls to be recorded")
    assert [(at[:16], decision) for at, decision in rows] == [
        ("2026-12-02 09:00", "allow"), ("2026-12-02 20:00", "escalate"), ("2026-12-05 10:00", "escalate"),
        ("2026-12-07 07:00", "allow")]


# -- the tool hints ---------------------------------------------------------------------------------------

MANIFEST = {"hosts": [{"host": "127.0.0.1", "mcp": [{
    "path": "/mcp", "server": "github", "unknown_tools": "policy",
    "tools": {
        "search_issues": {"severity": "low"},
        "delete_repository": {"severity": "critical", "reversible": False, "arguments": {"repo": {}}},
    },
}]}]}

POLICIES = """
@id("github-mcp-sessions")
permit (principal in Team::"ops", action == Action::"mcp_rpc", resource == McpServer::"github");

@id("github-tools")
permit (principal in Team::"ops", action == Action::"call_tool", resource in McpServer::"github");

@id("no-repository-deletion")
@reason("Agents never delete repositories.")
forbid (principal, action == Action::"call_tool", resource == Tool::"github/delete_repository");

@id("destructive-tools")
@reason("The server says this tool may destroy data: a human looks first.")
@escalate("security")
forbid (principal, action == Action::"call_tool", resource in McpServer::"github")
when { context has hints && context.hints.destructiveHint };
"""



@pytest.fixture(params=["sse", "json"])
def annotated_server(request, tmp_path):
    yield from _start_server(tmp_path, "--annotated", *(["--json-response"] if request.param == "json" else []))


def start_hints_gate(tmp_path, policy_dir, upstream, *args: str):
    use_manifest(policy_dir, MANIFEST, POLICIES)
    return start_cedargate(write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream), *args)


@pytest.fixture
def hints_gate(tmp_path, policy_dir, upstream):
    gate = start_hints_gate(tmp_path, policy_dir, upstream)
    yield gate
    gate.stop()


@pytest.mark.skipif(not PEER_PYTHON.exists(), reason="the MCP peers' venv is built by `make test`")
def test_a_tool_the_server_marks_destructive_needs_a_human_and_a_lie_changes_nothing(hints_gate, annotated_server):
    steps = [
        {"op": "list_tools"},
        {"op": "call_tool", "name": "list_branches", "arguments": {"repo": "acme/web"}},
        {"op": "call_tool", "name": "wipe_cache", "arguments": {"repo": "acme/web"}},
        # The server claims this one is read-only; the manifest classifies it, and policy refuses it.
        {"op": "call_tool", "name": "delete_repository", "arguments": {"repo": "acme/web"}},
    ]
    listed, branches, wipe, delete = run_agent(hints_gate, annotated_server.url, steps, "Prefer: wait=0")

    assert "wipe_cache" in listed["tools"] and "list_branches" in listed["tools"]
    assert "delete_repository" not in listed["tools"]  # hard-denied, so hidden: the hint did not change that
    assert branches["is_error"] is False and branches["text"] == "main, release"
    assert wipe["is_error"] is True
    problem = wipe["meta"]["cedargate/problem"]
    assert problem["type"] == "urn:cedargate:problem:override-pending"
    assert [p["id"] for p in problem["policies"]] == ["destructive-tools"]
    assert delete["is_error"] is True
    assert delete["meta"]["cedargate/problem"]["type"] == "urn:cedargate:problem:policy-denied"
    assert [c.split()[0] for c in annotated_server.calls()] == ["list_branches"]
    # What the policy saw is on the override request a reviewer reads.
    deadline = time.monotonic() + 10
    with sqlite3.connect(hints_gate.database) as db:
        while not (found := db.execute("SELECT cedar_request FROM overrides").fetchall()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    hints = json.loads(found[0][0])["context"]["hints"]
    assert hints == {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": False,
                     "openWorldHint": False, "listed": True}


@pytest.mark.skipif(not PEER_PYTHON.exists(), reason="the MCP peers' venv is built by `make test`")
def test_status_under_workers_shows_the_tool_hints_the_workers_keep(tmp_path, policy_dir, upstream):
    """The supervisor answering /status proxies nothing and so learns no hints: what it says under
    `tool_hints` is what the workers keep (the most any of them keeps for a server)."""
    gate = start_hints_gate(tmp_path, policy_dir, upstream, "--workers", "2")
    try:
        def tool_hints() -> dict:
            return httpx.get(f"{gate.api_url}/status", timeout=10).json()["tool_hints"]

        assert tool_hints() == {}
        with contextmanager(_start_server)(tmp_path, "--annotated", "--json-response") as server:
            [listed] = run_agent(gate, server.url, [{"op": "list_tools"}])
        # Every tool listed but those the manifest classifies (search_issues; delete_repository is hidden).
        unclassified = set(listed["tools"]) - set(MANIFEST["hosts"][0]["mcp"][0]["tools"])
        assert {"list_branches", "wipe_cache"} <= unclassified
        wait_until(lambda: tool_hints() == {"github": len(unclassified)}, what="the hints a worker keeps")
    finally:
        assert gate.stop() == 0


def _stops(gate) -> list[tuple[str, str]]:
    with sqlite3.connect(gate.database) as db:
        return db.execute("SELECT at, decision FROM decisions WHERE path LIKE '%/stop' ORDER BY at").fetchall()
