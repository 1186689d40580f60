"""`cedargate replay`: what a candidate policy directory would have decided on the recorded calls.

The candidate directory is loaded as `cedargate run` and `cedargate check` load a policy set (schema,
annotations, the action manifest if it has one), so a set replay accepts is one the proxy would run. The
store is found as `cedargate audit verify` finds it. It prints the decisions that would change, grouped by
the change and the determining policies on each side, with examples; it contacts no upstream and writes
nothing. Exit 0 when nothing would change, 1 when something would, 2 when it cannot replay.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from proxy.cedar.engine import Engine
from proxy.cedar.escalation import parse_duration
from proxy.cedar.policy import PolicyLoadError
from proxy.cli.audit_commands import StoreNotFound, add_store_arguments, open_record
from proxy.decision.replay import EXAMPLES, ReplayError, ReplayReport, replay
from proxy.vocabulary.printable import printable, printable_json


def add_replay_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    command = subparsers.add_parser(
        "replay", help="re-decide recorded calls against a candidate policy directory and show what would "
        "change (contacts no upstream); exit 0 if nothing would, 1 if something would")
    command.add_argument("--policies", required=True, metavar="DIR", help="the candidate policy directory")
    command.add_argument("--since", default="7d",
                         help="how far back: a duration (7d, 12h, 30m) or an ISO 8601 time (default 7d)")
    command.add_argument("--examples", type=int, default=EXAMPLES, help="examples shown per change (default 3)")
    command.add_argument("--json", action="store_true", help="print the report as JSON")
    add_store_arguments(command)


def run_replay_command(args: argparse.Namespace) -> int:
    try:
        since = _since(args.since)
    except ValueError as exc:
        return _fail(str(exc))
    if args.examples < 0:
        return _fail(f"--examples must be 0 or more, not {args.examples}")
    try:
        candidate = Engine(args.policies)
    except PolicyLoadError as exc:  # the operator's own files, quoted over several lines, as `check` does
        print(f"cedargate: candidate policies not loaded: {exc}", file=sys.stderr)
        return 2
    try:
        store, shown, _ = open_record(args)
    except StoreNotFound as exc:
        return _fail(str(exc))
    try:
        report = replay(store, candidate, since, examples=args.examples)
    except ReplayError as exc:
        return _fail(f"{shown}: {exc}")
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return _fail(f"cannot read the decisions in {shown}: {type(cause).__name__}: {cause}")
    finally:
        store.dispose()
        candidate.close()
    print(printable_json(report.as_dict(), indent=2) if args.json else _text(report))
    return 1 if report.changes else 0


def _since(text: str) -> datetime:
    try:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r} is neither a duration like 7d, 12h or 30m nor an ISO 8601 time "
                         "like 2026-12-01T09:00:00Z") from None
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


def _text(report: ReplayReport) -> str:
    lines = [
        f"replayed {report.replayed} of {report.decisions} decisions recorded since "
        f"{report.since.isoformat(timespec='seconds')} against {report.candidate_dir} "
        f"(revision {report.candidate_revision[:12]})",
        f"  {report.unchanged} unchanged, {report.changed} would change",
    ]
    if report.without_request:
        lines.append(f"  {report.without_request} had no stored Cedar request (cleared after "
                     "cedar_request_retention, or recorded before requests were kept): not replayed")
    if report.not_mapped:
        lines.append(f"  {report.not_mapped} were refused before any policy was consulted (not mappable, or an "
                     "action the manifest does not know): nothing to replay")
    for change in report.changes:
        lines += [
            "",
            f"{change.recorded} -> {change.candidate}: {change.count} call{'s' if change.count != 1 else ''}",
            f"  recorded by   {_policies(change.recorded_policies)}",
            f"  candidate by  {_policies(change.candidate_policies)}",
        ]
        for example in change.examples:
            # The call is an agent's: escaped, like every view of it.
            lines.append(printable(f"    {example.agent} {example.method} {example.url}  {example.action}  "
                                   f"({example.at.isoformat(timespec='seconds')}, decision {example.decision_id})"))
    return "\n".join(lines)


def _policies(ids: tuple[str, ...]) -> str:
    return printable(", ".join(ids)) if ids else "(no policy: default deny)"


def _fail(message: str) -> int:
    print(printable(f"cedargate: {message}"), file=sys.stderr)
    return 2
