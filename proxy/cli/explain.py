"""`cedargate explain`: how one call would be mapped and decided, without sending it anywhere.

It reads the same policy directory as the proxy and decides the call with the proxy's own function
(`proxy.decision.decisions.decide_call`: mapping, scope-indexed Cedar evaluation, escalation rules, a
JSON-RPC batch message by message), but records nothing and contacts no upstream: an operator can ask
"what happens if the agent does this?" before the agent does.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from proxy.calls.mapping import Call, MappingOptions
from proxy.cedar.engine import Engine
from proxy.cedar.escalation import is_escalatable
from proxy.cedar.policy import PolicyLoadError
from proxy.cli.explain_recorded import explain_recorded
from proxy.decision.decisions import decide_call
from proxy.decision.gate import Gate, Outcome, Verdict
from proxy.settings.config import ConfigError, load_settings
from proxy.vocabulary.printable import printable, printable_json
from proxy.vocabulary.problems import Problem


def add_explain_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explain = subparsers.add_parser("explain", help="show how a call maps to Cedar and what would be decided")
    explain.add_argument("method", nargs="?", help="HTTP method, e.g. POST")
    explain.add_argument("url", nargs="?", help="the full URL the agent calls")
    explain.add_argument("--agent", help="the agent id the call is made under (required with a method and URL)")
    explain.add_argument("--decision", metavar="ID", help="instead of a call: a recorded decision, explained from "
                         "the Cedar request it was made on and decided again under --policy-dir")
    explain.add_argument("--state-dir", help="with --decision: state dir whose cedargate.db to read")
    explain.add_argument("--database-url", help="with --decision: SQLAlchemy URL of the decision store")
    explain.add_argument("--header", "-H", action="append", default=[], metavar="NAME: VALUE")
    explain.add_argument("--data", "-d", help="the request body (sent as application/json if it parses as JSON)")
    explain.add_argument("--policy-dir", default="policies")
    explain.add_argument("--at", help="decide it as if at this time, ISO 8601 (2026-12-05T21:00, in the time zone, "
                         "or with an offset); default now")
    explain.add_argument("--config", default="cedargate.yaml",
                         help="read time_zone (context.local) from this file, if it exists (default ./cedargate.yaml)")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")


def run_explain_command(args: argparse.Namespace) -> int:
    if args.decision is not None:
        if args.method or args.url or args.agent:
            print("cedargate: give either --decision ID or a call (METHOD URL --agent ID), not both", file=sys.stderr)
            return 2
        return explain_recorded(args, _explain, _text)
    if not (args.method and args.url and args.agent):
        print("cedargate: explain needs METHOD URL --agent ID (or --decision ID)", file=sys.stderr)
        return 2
    try:
        call = _call_of(args)
    except ValueError as exc:
        print(printable(f"cedargate: {exc}"), file=sys.stderr)
        return 2
    try:
        engine = Engine(args.policy_dir)
    except PolicyLoadError as exc:
        print(f"cedargate: {exc}", file=sys.stderr)
        return 2
    try:
        mapping, at = _when(args)
    except (ValueError, ConfigError) as exc:
        print(printable(f"cedargate: {exc}"), file=sys.stderr)
        return 2
    report = explain(engine, call, mapping, at=at)
    if args.json:
        print(printable_json(report, indent=2, default=str))
    else:
        print(_text(report))
    return 0 if report["decision"] == "allow" else 1


def _when(args: argparse.Namespace) -> tuple[MappingOptions, datetime | None]:
    """The time zone of the config (UTC without one) and the `--at` instant, read in that zone."""
    config = Path(args.config)
    zone = ZoneInfo(load_settings(config).time_zone if config.is_file() else "UTC")
    if args.at is None:
        return MappingOptions(time_zone=zone), None
    try:
        at = datetime.fromisoformat(args.at)
    except ValueError:
        raise ValueError(f"--at {args.at!r} is not an ISO 8601 time such as 2026-12-05T21:00 or "
                         "2026-12-05T20:00:00Z") from None
    return MappingOptions(time_zone=zone), (at.replace(tzinfo=zone) if at.tzinfo is None else at).astimezone(UTC)


def explain(engine: Engine, call: Call, mapping: MappingOptions | None = None, *,
            at: datetime | None = None) -> dict[str, Any]:
    """The mapping, the decision and why, as plain data (nothing is recorded); `at`: as if then.

    A JSON-RPC batch to an MCP endpoint is decided message by message, as the proxy does: the report
    then has one report per message under "batch", and its decision is "allow" only if all are allowed.
    """
    gate = Gate(engine, recorder=None, mapping=mapping) if at is None else \
        Gate(engine, recorder=None, mapping=mapping, clock=lambda: at)
    decision = decide_call(gate, call)  # as the proxy decides it
    parts = [_explain(gate, verdict) for verdict in decision.verdicts]
    if not decision.batch:
        return parts[0]
    decisions = {p["decision"] for p in parts}
    return {"call": parts[0]["call"], "batch": parts,
            "decision": "allow" if decisions == {"allow"} else "/".join(sorted(decisions - {"allow"}))}


def _explain(gate: Gate, verdict: Verdict) -> dict[str, Any]:
    call, request = verdict.call, verdict.request
    report: dict[str, Any] = {
        "call": {"agent": call.agent, "method": call.method.upper(), "url": call.url},
        "principal": f'{request.principal[0]}::"{request.principal[1]}"' if request else None,
        "action": verdict.action or None,
        "resource": verdict.resource or None,
        "context": request.context if request else None,
        "decision": verdict.outcome.value,
        "policy_revision": verdict.revision,
        "policies": [
            {"id": p.policy_id, "effect": p.effect, "file": f"{p.file}:{p.line}", "annotations": dict(p.annotations)}
            for p in verdict.determining
        ],
        "errors": list(verdict.errors),
        "detail": verdict.detail or None,
        "problem": verdict.problem.uri if verdict.problem else None,
    }
    if verdict.outcome is Outcome.ESCALATE and verdict.escalation:
        report["escalation"] = {
            "requirements": [r.as_dict() for r in verdict.escalation.requirements],
            "expires_in_seconds": verdict.escalation.expires_in,
        }
    if not verdict.allowed:
        report["grantable"] = _grantable(verdict)
    if request and request.action == ("Action", "call_tool"):
        tool = request.context["tool"]
        report["listed_in_tools_list"] = bool(gate.visible_tools(call, [tool]))
    return report


def _grantable(verdict: Verdict) -> dict[str, Any]:
    """Whether a human could grant the refused call, and why (not), by the rule the gate applies:
    every determining forbid escalatable, and a permit allowing the call once they are lifted."""
    forbids = [p for p in verdict.determining if p.effect == "forbid"]
    lifts = [p.policy_id for p in forbids if is_escalatable(p)]
    permits = [p.policy_id for p in verdict.beneath]
    if verdict.outcome is Outcome.ESCALATE:
        why = (f"with the @escalate {_plural('forbid', lifts)} lifted, {_plural('permit', permits)} "
               f"{', '.join(permits)} {'allows' if len(permits) == 1 else 'allow'} the call")
    elif verdict.problem not in (Problem.POLICY_DENIED, Problem.NO_PERMIT):
        why = f"a refusal of type {verdict.problem.value if verdict.problem else 'error'} is never escalated"
    elif len(lifts) < len(forbids):
        plain = [p.policy_id for p in forbids if not is_escalatable(p)]
        why = f"{_plural('forbid', plain)} {', '.join(plain)} {'has' if len(plain) == 1 else 'have'} no @escalate"
    elif forbids:
        why = (f"{_plural('forbid', lifts)} {', '.join(lifts)} {'carries' if len(lifts) == 1 else 'carry'} "
               f"@escalate, but with {'it' if len(lifts) == 1 else 'them'} lifted no permit allows the call; "
               "a grant lifts a forbid, it never stands in for a permit")
    else:
        why = "no permit allows the call (default deny)"
    return {"grantable": verdict.outcome is Outcome.ESCALATE, "lifts": lifts, "permitted_by": permits, "why": why}


def _plural(noun: str, items: list[Any]) -> str:
    return noun if len(items) == 1 else noun + "s"


def _call_of(args: argparse.Namespace) -> Call:
    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{args.url!r} is not an http(s) URL")
    headers: dict[str, str] = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header {header!r} must be 'Name: value'")
        headers[name.strip()] = value.strip()
    body = (args.data or "").encode()
    if body and not any(k.lower() == "content-type" for k in headers):
        try:
            json.loads(body)
            headers["Content-Type"] = "application/json"
        except ValueError:
            headers["Content-Type"] = "application/octet-stream"
    return Call(
        agent=args.agent, method=args.method.upper(), scheme=url.scheme, host=url.hostname,
        port=url.port or (443 if url.scheme == "https" else 80), path=url.path or "/", query=url.query,
        headers=headers, body=body,
    )


def _text(report: dict[str, Any]) -> str:
    if "batch" in report:
        return "\n\n".join(f"message {i} of the batch\n" + _text(part) for i, part in enumerate(report["batch"]))
    # Every line but the context (JSON, escaped as JSON) is escaped here: the call is an agent's.
    lines = [
        printable(f"call      {report['call']['agent']}: {report['call']['method']} {report['call']['url']}"),
        printable(f"principal {report['principal']}"),
        printable(f"action    {report['action']}"),
        printable(f"resource  {report['resource']}"),
        f"context   {printable_json(report['context'], sort_keys=True)}",
        "",
        f"decision  {report['decision'].upper()}" + (f"  ({report['problem']})" if report["problem"] else ""),
    ]
    if report["detail"]:
        lines.append(printable(f"          {report['detail']}"))
    for policy in report["policies"]:
        notes = ", ".join(f'@{k}("{v}")' for k, v in policy["annotations"].items() if k != "id")
        line = f"  {policy['effect']:<6} {policy['id']}  ({policy['file']}) {notes}".rstrip()
        lines.append(printable(line))
    for error in report["errors"]:
        lines.append(printable(f"  error  {error}"))
    if "grantable" in report:
        grantable = report["grantable"]
        lines.append(printable(("grantable: " if grantable["grantable"] else
                                "hard deny, no human can override it: ") + grantable["why"]))
    if "escalation" in report:
        for requirement in report["escalation"]["requirements"]:
            lines.append(printable(
                f"escalates to {' + '.join(requirement['roles'])} ({requirement['approvals']} distinct "
                f"approver(s)) for {requirement['policy_id']}; pending requests expire after "
                f"{report['escalation']['expires_in_seconds']} s"
            ))
    if "listed_in_tools_list" in report:
        lines.append("tools/list " + ("shows this tool to the agent" if report["listed_in_tools_list"]
                                      else "hides this tool from the agent: policy denies every call of it"))
    lines.append(printable(f"policy revision {report['policy_revision']}"))
    return "\n".join(lines)
