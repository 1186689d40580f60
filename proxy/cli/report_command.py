"""`cedargate report`: escalation, approval and change rates, review latency and expiries per policy and per
reviewer over a window, the rubber-stamp candidates with the narrowed forbid for each, and the reviewers
who approve nearly everything (`proxy.oversight.report` says how each figure is made).

It reads the store `cedargate run` would use (`--config`, `--state-dir`, `--database-url`, as `cedargate
audit verify`), the live policies from the config's policy directory (or `--policy-dir`) for the
suggestions, and the configured approvers for the reviewers who never voted. A table for people; `--json`
for machines. Exit 0 with a report, 2 when it cannot be made (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError

from proxy.cedar.escalation import parse_duration
from proxy.cedar.policy import PolicyLoadError, load_bundle
from proxy.cli.audit_commands import StoreNotFound, add_store_arguments, open_record
from proxy.oversight.report import DEFAULT_MIN_REQUESTS, DEFAULT_THRESHOLD, Report, build_report, parse_threshold
from proxy.record.store import utcnow
from proxy.settings.config import ConfigError, load_settings
from proxy.vocabulary.printable import printable


def add_report_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = subparsers.add_parser(
        "report", help="rates, review latency and expiries per policy and reviewer; rubber-stamp candidates")
    report.add_argument("--since", default="7d", help="the window, back from now: 30m, 12h, 7d (default 7d)")
    report.add_argument("--threshold", default=f"{DEFAULT_THRESHOLD:.0%}",
                        help="approved without changes at or above this share makes a policy a candidate, and "
                             "approvals at or above it flag a reviewer: 99%% or 0.99 (default 99%%)")
    report.add_argument("--min-requests", type=int, default=DEFAULT_MIN_REQUESTS,
                        help="decided requests a policy needs (votes a reviewer needs) before it is judged "
                             f"(default {DEFAULT_MIN_REQUESTS})")
    report.add_argument("--policy-dir", help="the policies the suggestions are made from (default: the config's)")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    add_store_arguments(report)


def run_report_command(args: argparse.Namespace) -> int:
    try:
        window = parse_duration(args.since)
    except ValueError as exc:
        return _fail(f"--since {args.since!r}: {exc} (e.g. 30m, 12h, 7d)")
    try:
        threshold = parse_threshold(args.threshold)
    except ValueError as exc:
        return _fail(f"--{exc}")
    if args.min_requests < 1:
        return _fail(f"--min-requests {args.min_requests}: give at least 1")
    try:
        settings = load_settings(args.config, {"state_dir": args.state_dir, "database_url": args.database_url,
                                               "policy_dir": args.policy_dir})
        engine, shown, _ = open_record(args)
    except (ConfigError, StoreNotFound) as exc:
        return _fail(str(exc))
    try:
        bundle = load_bundle(settings.policy_dir)
    except PolicyLoadError as exc:
        print(printable(f"cedargate: no suggestions: the policies do not load: {exc}"), file=sys.stderr)
        bundle = None
    until = utcnow()
    try:
        report = build_report(engine, until - timedelta(seconds=window), until, threshold=threshold,
                              min_requests=args.min_requests, bundle=bundle,
                              approver_roles={name: frozenset(a.roles) for name, a in settings.approvers.items()})
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return _fail(f"cannot read {shown}: {type(cause).__name__}: {cause}")
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(printable_report(report, args.since), end="")
    return 0


def printable_report(report: Report, window: str) -> str:
    """The report as tables and text for a person (names escaped; the suggested Cedar escapes its own)."""
    out = [f"cedargate report, {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} UTC ({window}): "
           f"{report.decisions} calls decided, {report.escalations} escalated ({_share(report.escalation_rate)}), "
           f"{report.requests} override requests", ""]
    rows = [[p.policy, p.escalations, _share(p.escalation_rate), p.requests, p.approved, p.approved_with_changes,
             p.denied, p.expired, p.open, _share(p.approval_rate), _share(p.change_rate),
             _duration(p.latency_p50_s), _duration(p.latency_p95_s)] for p in report.policies]
    out += _table(["policy", "escalated", "esc. rate", "requests", "approved", "changed", "denied", "expired",
                   "open", "approval", "change", "p50", "p95"], rows, "no override requests or escalations")
    out.append("")
    rows = [[r.reviewer + (" (flagged)" if r.flagged else ""), r.votes, r.approvals, r.denials,
             _share(r.approval_rate), _share(r.change_rate), _duration(r.latency_p50_s),
             _duration(r.latency_p95_s), r.expiries] for r in report.reviewers]
    out += _table(["reviewer", "votes", "approved", "denied", "approval", "change", "p50", "p95", "expiries"],
                  rows, "no reviewers voted")
    out.append("")
    judged = f"{report.threshold:.1%}".replace(".0%", "%")
    out.append(f"Rubber-stamp candidates (approved without changes at or above {judged} of at least "
               f"{report.min_requests} decided requests): {len(report.candidates) or 'none'}")
    for candidate in report.candidates:
        out.append("")
        out.append(printable(f"{candidate.policy}: {candidate.approved_unchanged} of {candidate.decided} decided "
                             f"requests approved as sent ({_share(candidate.rate)})."))
        if candidate.suggestion is None:
            out.append(printable(f"  no suggestion: {candidate.why_no_suggestion}"))
            continue
        scope = "exactly the approved combinations" if candidate.exact else (
            "the approved principals, actions and resources in any combination"
            + (f", any {' or '.join(candidate.unconstrained)}" if candidate.unconstrained else ""))
        out += textwrap.wrap(printable(
            f"A narrowed forbid for {candidate.file} that stops asking for {scope}; it would also have let "
            f"through {candidate.denied_exempted} of the requests reviewers denied. It validates against the live "
            "schema; review it before use:"), 100, initial_indent="  ", subsequent_indent="  ")
        out.append("")
        out += [f"    {line}" for line in candidate.suggestion.splitlines()]
    flagged = [r for r in report.reviewers if r.flagged]
    out.append("")
    out.append(f"Flagged reviewers (approved at or above {judged} of at least {report.min_requests} votes): "
               + (printable(", ".join(f"{r.reviewer} ({_share(r.approval_rate)} of {r.votes})" for r in flagged))
                  or "none"))
    return "\n".join(out) + "\n"


def _table(header: list[str], rows: list[list[object]], empty: str) -> list[str]:
    if not rows:
        return [f"({empty})"]
    cells = [[printable(str(c)) for c in row] for row in [list[object](header), *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            .rstrip() for row in cells]


def _share(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, hours = seconds / 60, seconds / 3600
    if hours < 1:
        return f"{int(minutes)}m{int(seconds % 60):02d}s"
    if hours < 48:
        return f"{int(hours)}h{int(minutes % 60):02d}m"
    return f"{int(hours // 24)}d{int(hours % 24)}h"


def _fail(message: str) -> int:
    print(printable(f"cedargate: {message}"), file=sys.stderr)
    return 2
