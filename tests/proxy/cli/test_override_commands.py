"""`cedargate overrides list|watch|approve` as a reviewer runs them: against the real override API served on
loopback around a real core, with requests opened by the real gate; asserted on what the terminal shows."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from override_api.main import create_app
from proxy.calls.mapping import Call
from proxy.cedar.escalation import Escalation, Requirement, Tier
from proxy.cli.main import main
from proxy.cli.override_commands import Api
from proxy.cli.override_views import action_uid, span
from proxy.cli.override_watch import watch
from proxy.oversight.overrides import Ballot
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential

ROLES = {"erin": ("engineering-manager",), "fran": ("finance",), "sam": ("security",), "lee": ("lead-engineer",),
         "olga": ("on-call",)}


@pytest.fixture
def runtime_settings() -> dict[str, Any]:
    return {"approvers": {name: ApproverCredential(token_sha256=hashlib.sha256(f"{name}-token".encode()).hexdigest(),
                                                   roles=roles) for name, roles in ROLES.items()}}


@pytest.fixture
def api(runtime: Runtime) -> Iterator[str]:
    """The override API served by uvicorn on a loopback port of its own, as `cedargate run` serves it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(runtime), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def escalate(runtime: Runtime, call: Call, justification: str | None = None) -> str:
    verdict = runtime.gate.decide(call)
    resolution = asyncio.run(runtime.oversight.resolve(verdict, 0, justification, client_alive=lambda: True))
    assert resolution.override_id is not None
    return resolution.override_id


def production_stop(runtime: Runtime) -> str:
    return escalate(runtime, Call(agent="ops-bot", method="POST", scheme="http", host="127.0.0.1", port=9000,
                                  path="/v1/instances/i-0abc/stop"), "instance is wedged")


def large_refund(runtime: Runtime) -> str:
    return escalate(runtime, Call(agent="billing-bot", method="POST", scheme="https", host="api.payments.example",
                                  port=443, path="/v1/refunds/o-2", headers={"content-type": "application/json"},
                                  body=b'{"amount": 750, "currency": "EUR"}'))


def cedargate(api: str, *argv: str, approver: str = "erin",
              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    monkeypatch.setenv("CEDARGATE_APPROVER_TOKEN", f"{approver}-token")
    code = main(["overrides", "--api", api, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_each_request_with_age_time_left_and_why(runtime, api, monkeypatch, capsys):
    stop = production_stop(runtime)
    code, out, _ = cedargate(api, "list", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{stop}  pending ")
    assert "ops-bot" in lines[0] and "POST http://127.0.0.1:9000/v1/instances/i-0abc/stop" in lines[0]
    assert "age 0s" in lines[1] or "age 1s" in lines[1]
    assert " left" in lines[1]  # an hour by default: 59m59s or so
    assert lines[2] == "    why: Stopping an instance on a production-critical host needs a human decision."


def test_list_names_a_manifest_action_and_takes_it_with_or_without_action_quotes(runtime, api, monkeypatch,
                                                                                 capsys):
    production_stop(runtime)
    refund = large_refund(runtime)
    for spelled in ("process_refund", 'Action::"process_refund"'):
        code, out, _ = cedargate(api, "list", "--action", spelled, approver="fran", monkeypatch=monkeypatch,
                                 capsys=capsys)
        assert code == 0
        assert out.splitlines()[0].startswith(f"{refund}  pending ")
        assert 'POST Action::"process_refund" https://api.payments.example/v1/refunds/o-2' in out
        assert "i-0abc" not in out


def test_list_shows_key_arguments_severity_roles_needed_and_votes(runtime, api, monkeypatch, capsys):
    large_refund(runtime)
    code, out, _ = cedargate(api, "list", approver="fran", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[1] == "    order_id=o-2 amount=750.0 currency=EUR"
    assert "severity high · reversible false · needs finance · votes: none yet" in lines[2]

    deletion = escalate(runtime, Call(agent="ops-bot", method="DELETE", scheme="http", host="localhost", port=9000,
                                      path="/v1/volumes/vol-1"))
    runtime.workflow.vote(deletion, "sam", frozenset({"security"}), Ballot.APPROVE, "backed up first")
    code, out, _ = cedargate(api, "list", approver="lee", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    assert out.splitlines()[0].startswith(f"{deletion}  pending ")
    assert 'needs lead-engineer · votes: sam approve "backed up first"' in out.splitlines()[1]


def test_list_json_is_the_apis_answer(runtime, api, monkeypatch, capsys):
    stop = production_stop(runtime)
    code, out, _ = cedargate(api, "list", "--json", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    listed = json.loads(out)
    assert [item["id"] for item in listed] == [stop]
    assert listed[0]["status"] == "pending" and listed[0]["agent"] == "ops-bot"


def test_an_escape_sequence_an_agent_sent_is_shown_not_obeyed(runtime, api, monkeypatch, capsys):
    # The gate refuses such a path; opened directly, as if a looser mapping had let it through.
    stop = Call(agent="ops-bot", method="POST", scheme="http", host="127.0.0.1", port=9000,
                path="/v1/instances/i-\x1b[2K\u202e/stop")
    runtime.workflow.open(
        stop, decision_id=str(uuid.uuid4()), escalation=Escalation((Requirement("p", ("engineering-manager",), 1),),
                                                                    600),
        policies=[{"id": "p", "reason": "why \x1b[31m", "annotations": {}}],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"127.0.0.1"', "context": {}},
        revision="rev-1", justification=None,
    )
    code, out, _ = cedargate(api, "list", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and "\x1b" not in out and "\u202e" not in out
    assert "/v1/instances/i-\\x1b[2K\\u202e/stop" in out and "why \\x1b[31m" in out


def test_watch_once_shows_the_waiting_requests(runtime, api, monkeypatch, capsys):
    code, out, _ = cedargate(api, "watch", "--once", monkeypatch=monkeypatch, capsys=capsys)
    assert (code, out) == (0, "no override requests waiting\n")
    stop = production_stop(runtime)
    code, out, _ = cedargate(api, "watch", "--once", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    assert f" waiting  {stop}  pending " in out.splitlines()[0]


def test_watch_prints_arrivals_and_decisions(runtime, api, monkeypatch, capsys):
    monkeypatch.setenv("CEDARGATE_APPROVER_TOKEN", "erin-token")
    opened: list[str] = []
    steps = iter([
        lambda: opened.append(production_stop(runtime)),
        lambda: runtime.workflow.vote(opened[0], "erin", frozenset({"engineering-manager"}),
                                      Ballot.DENY,
                                      "not during the freeze"),
    ])

    def between_looks(_: float) -> None:  # what happens in the world while the watcher sleeps
        next(steps)()

    assert watch(Api(api, "erin-token"), 0.01, once=False, looks=3, sleep=between_looks) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "no override requests waiting"
    assert f" new      {opened[0]}  pending " in lines[1]
    assert any(f" denied   {opened[0]}  denied " in line and line.endswith(': "not during the freeze"')
               for line in lines[2:]), lines


def test_watch_once_says_when_the_api_cannot_be_reached(monkeypatch, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        code, out, err = cedargate(f"http://127.0.0.1:{sock.getsockname()[1]}", "watch", "--once",
                                   monkeypatch=monkeypatch, capsys=capsys)
    finally:
        sock.close()
    assert code == 1 and out == ""
    assert err.startswith("cedargate: - cannot reach the API: http://127.0.0.1:") and err.count("\n") == 1


@pytest.mark.parametrize("given, uid", [("process_refund", 'Action::"process_refund"'),
                                        ('Action::"process_refund"', 'Action::"process_refund"'),
                                        (" post ", 'Action::"post"')])
def test_an_action_is_taken_with_or_without_its_type(given, uid):
    assert action_uid(given) == uid


@pytest.mark.parametrize("seconds, shown", [(0, "0s"), (59.9, "59s"), (65, "1m05s"), (3720, "1h02m"),
                                            (90000, "1d01h"), (-3, "0s")])
def test_spans_read_at_a_glance(seconds, shown):
    assert span(seconds) == shown


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("cedargate ") and out.split()[1][0].isdigit()


def test_watch_shows_a_request_waiting_on_the_agent_and_list_filters_it(runtime, api, monkeypatch, capsys):
    stop = production_stop(runtime)
    steps = iter([lambda: runtime.workflow.request_info(stop, "erin", frozenset({"engineering-manager"}),
                                                        "Which ticket is this for?")])
    assert watch(Api(api, "erin-token"), 0.01, once=False, looks=2, sleep=lambda _: next(steps)()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f" waiting  {stop}  pending " in lines[0]
    assert any(f" needs_info {stop}  needs_info " in line for line in lines[1:]), lines
    # Still undecided: the next watcher shows it waiting, and list finds it by its status.
    code, out, _ = cedargate(api, "watch", "--once", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and f" waiting  {stop}  needs_info " in out
    code, out, _ = cedargate(api, "list", "--status", "needs_info", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and out.startswith(f"{stop}  needs_info ")


def staging_stop(runtime: Runtime) -> str:
    """A staging stop under the seeds' chain (staging-after-hours', opened whatever the hour it is)."""
    chain = Requirement("staging-after-hours", ("on-call",), 1,
                        (Tier(600, ("secondary-on-call",)), Tier(1800, ("engineering-manager",))))
    override, _ = runtime.workflow.open(
        Call(agent="ops-bot", method="POST", scheme="https", host="cloud.staging.example", port=443,
             path="/v1/instances/i-9/stop"),
        decision_id=str(uuid.uuid4()), escalation=Escalation((chain,), 3600, 300),
        policies=[{"id": chain.policy_id, "reason": None, "annotations": {}}],
        cedar_request={"principal": 'Agent::"ops-bot"', "action": 'Action::"post"',
                       "resource": 'Host::"cloud.staging.example"', "context": {}},
        revision="rev-1", justification="instance is wedged")
    return override.id


def test_list_and_show_say_where_a_request_stands_in_its_escalation_chain(runtime, api, monkeypatch, capsys):
    staging = staging_stop(runtime)  # on-call, the secondary at 10m, the manager at 30m
    code, out, _ = cedargate(api, "list", approver="olga", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{staging}  pending ")
    assert re.search(r"votes: none yet · tier 1/3, tier 2 in 9m[0-9]{2}s, primary olga$", lines[1]), lines[1]

    code, out, _ = cedargate(api, "show", staging, approver="olga", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    shown = out[out.index("escalation chain:"):].splitlines()
    assert re.fullmatch(r"  -> tier 1: on-call  at opening \(\S+ \S+ UTC\), reached", shown[1]), shown[1]
    assert re.fullmatch(r"     tier 2: secondary-on-call  after 10m00s \(\S+ \S+ UTC\), not yet", shown[2]), shown[2]
    assert re.fullmatch(r"     tier 3: engineering-manager  after 30m00s \(\S+ \S+ UTC\), not yet", shown[3])
    assert re.fullmatch(r"  next: tier 2 at \S+ \S+ UTC \(in 9m[0-9]{2}s\)", shown[4]), shown[4]
    assert shown[5:7] == ["  reminders every 5m00s", "  primary reviewer: olga"]
    # The manager's tier is not reached: the manager does not see the request yet.
    code, out, _ = cedargate(api, "list", approver="erin", monkeypatch=monkeypatch, capsys=capsys)
    assert staging not in out
