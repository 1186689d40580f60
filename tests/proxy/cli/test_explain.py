"""`cedargate explain`: the mapping and the decision for one call, from the policy directory alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from proxy_support import POLICIES

CEDARGATE = Path(sys.executable).parent / "cedargate"
GITHUB_MCP = "http://mcp.github.example/mcp"


def explain(*args: str) -> tuple[int, str, str]:
    done = subprocess.run([str(CEDARGATE), "explain", *args, "--policy-dir", str(POLICIES)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


def tool_call(name: str, arguments: dict, id: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


def test_a_manifest_route_shows_its_action_fields_and_escalation():
    code, out, _ = explain("POST", "https://api.payments.example/v1/refunds/o-77", "--agent", "billing-bot",
                           "-d", '{"amount": 750, "currency": "EUR"}')
    assert code == 1
    assert 'action    Action::"process_refund"' in out and 'resource  Host::"api.payments.example"' in out
    assert '"order_id": "o-77"' in out
    assert "decision  ESCALATE" in out and "escalates to finance (1 distinct approver(s)) for large-refunds" in out


def test_an_allowed_call_exits_zero_and_json_is_the_same_report():
    code, out, _ = explain("GET", "http://localhost:9000/v1/instances", "--agent", "ops-bot", "--json")
    report = json.loads(out)
    assert code == 0 and report["decision"] == "allow" and report["action"] == 'Action::"get"'
    assert [p["id"] for p in report["policies"]] == ["ops-read"]


def test_an_mcp_tool_call_shows_the_tool_its_arguments_and_whether_it_is_listed():
    code, out, _ = explain("POST", GITHUB_MCP, "--agent", "ops-bot", "--json",
                           "-d", json.dumps(tool_call("merge_pull_request", {"repo": "acme/payments", "number": 7})))
    report = json.loads(out)
    assert code == 1 and report["decision"] == "deny"
    assert (report["action"], report["resource"]) == ('Action::"call_tool"', 'Tool::"github/merge_pull_request"')
    assert report["context"]["arguments"] == {"repo": "acme/payments", "number": 7}
    assert [p["id"] for p in report["policies"]] == ["no-merges-to-payments"]
    assert report["listed_in_tools_list"] is True  # denied for this repository only


def test_a_hard_denied_tool_is_said_to_be_hidden():
    code, out, _ = explain("POST", GITHUB_MCP, "--agent", "ops-bot",
                           "-d", json.dumps(tool_call("transfer_repository", {"repo": "acme/web"})))
    assert code == 1 and "tools/list hides this tool from the agent" in out


def test_a_batch_is_explained_message_by_message():
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
             tool_call("delete_repository", {"repo": "acme/old"}, id=2)]
    code, out, _ = explain("POST", GITHUB_MCP, "--agent", "ops-bot", "--json", "-d", json.dumps(batch))
    report = json.loads(out)
    assert code == 1 and report["decision"] == "escalate"
    assert [(p["action"], p["decision"]) for p in report["batch"]] == [
        ('Action::"mcp_rpc"', "allow"), ('Action::"call_tool"', "escalate")]
    code, text, _ = explain("POST", GITHUB_MCP, "--agent", "ops-bot", "-d", json.dumps(batch))
    assert "message 0 of the batch" in text and "message 1 of the batch" in text


@pytest.mark.parametrize("args, message", [
    (("GET", "ftp://x/y", "--agent", "a"), "is not an http(s) URL"),
    (("GET", "http://x/y", "--agent", "a", "-H", "no colon"), "must be 'Name: value'"),
])
def test_bad_input_is_a_clear_error(args, message):
    code, _, err = explain(*args)
    assert code == 2 and message in err


def test_the_text_report_escapes_what_a_terminal_would_act_on():
    url = "http://127.0.0.1:9000/v1/instances/i-1\x1b[2K\x9bGET harmless/stop?x=\u202e1"
    _, out, _ = explain("POST", url, "--agent", "ops-bot")
    assert "\x1b" not in out and "\x9b" not in out and "\u202e" not in out
    assert "i-1\\x1b[2K\\x9bGET harmless/stop?x=\\u202e1" in out
    _, as_json, _ = explain("POST", url, "--agent", "ops-bot", "--json")
    assert "\x1b" not in as_json and json.loads(as_json)["call"]["url"] == url


def test_at_decides_the_call_as_if_then_on_the_config_s_wall_clock():
    stop = ("POST", "https://cloud.staging.example/v1/instances/i-7/stop", "--agent", "ops-bot", "--json")
    code, out, _ = explain(*stop, "--at", "2026-12-05T21:00", "--config", str(POLICIES.parent / "cedargate.yaml"))
    report = json.loads(out)
    assert code == 1 and report["decision"] == "escalate"
    assert [p["id"] for p in report["policies"]] == ["staging-after-hours"]
    # 21:00 is read in the config's time zone (Europe/Berlin): 20:00 UTC.
    assert report["context"]["time"] == {"__extn": {"fn": "datetime", "arg": "2026-12-05T20:00:00Z"}}
    assert report["context"]["local"] == {"hour": 21, "minute": 0, "weekday": "saturday", "date": "2026-12-05"}
    code, out, _ = explain(*stop, "--at", "2026-12-02T09:00:00Z", "--config", str(POLICIES.parent / "cedargate.yaml"))
    assert code == 0 and json.loads(out)["context"]["local"]["hour"] == 10


def test_a_bad_at_says_what_to_give():
    code, _, err = explain("GET", "http://localhost:9000/v1/instances", "--agent", "ops-bot", "--at", "Tuesday")
    assert code == 2 and "--at 'Tuesday' is not an ISO 8601 time such as 2026-12-05T21:00" in err
