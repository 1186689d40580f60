"""`cedargate explain --decision ID`: a recorded decision explained from the Cedar request it was made on.

The record keeps each decision's Cedar request for `cedar_request_retention` (secrets redacted). This
reads it back, shows what was decided then (decision, determining policies, revision, time), and decides
the same request again under the policy directory given, worded as `explain` words a call: an operator can
ask "why was this refused, and would it be now?" without the call being made again. It writes nothing and
contacts no upstream.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.exc import SQLAlchemyError

from proxy.calls.mapping import Call
from proxy.cedar.engine import Engine
from proxy.cedar.policy import PolicyLoadError
from proxy.cli.audit_commands import StoreNotFound, open_record
from proxy.decision.gate import Gate, Verdict
from proxy.decision.replay import recorded_policies, stored_request
from proxy.record.store import DecisionRecord
from proxy.vocabulary.printable import printable, printable_json

_decisions: Table = DecisionRecord.__table__  # type: ignore[attr-defined]  # SQLModel sets it, untyped


def explain_recorded(args: argparse.Namespace, explained: Callable[[Gate, Verdict], dict[str, Any]],
                     text: Callable[[dict[str, Any]], str]) -> int:
    """`explained(gate, verdict)` and `text(report)` are explain's own (passed in: that module calls this
    one), so a recorded decision's explanation reads as a call's does."""
    config = args.config if Path(args.config).is_file() else None
    try:
        store, shown, _ = open_record(argparse.Namespace(config=config, state_dir=args.state_dir,
                                                     database_url=args.database_url))
    except StoreNotFound as exc:
        return _fail(str(exc))
    try:
        with store.connect() as conn:
            row = conn.execute(select(_decisions).where(_decisions.c.decision_id == args.decision)).first()
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return _fail(f"cannot read the decisions in {shown}: {type(cause).__name__}: {cause}")
    finally:
        store.dispose()
    if row is None:
        return _fail(f"no decision {args.decision} in {shown}")
    if row.cedar_request is None:
        why = ("it was refused before any policy was consulted" if not row.action else
               "it was cleared after cedar_request_retention, or recorded before requests were kept")
        return _fail(f"decision {args.decision} keeps no Cedar request: {why}")
    try:
        engine = Engine(args.policy_dir)
    except PolicyLoadError as exc:
        print(f"cedargate: {exc}", file=sys.stderr)
        return 2
    request = stored_request(row.cedar_request)
    query = request.context.get("query")
    call = Call(agent=row.agent, method=row.method, scheme=row.scheme, host=row.host, port=row.port,
                path=row.path, query=query if isinstance(query, str) else "")
    gate = Gate(engine, recorder=None)
    report = explained(gate, gate.redecide(call, request))
    report["recorded"] = {"decision_id": row.decision_id, "at": row.at.isoformat(), "decision": row.decision,
                          "policies": recorded_policies(row.determining_policies),
                          "policy_revision": row.policy_revision}
    if args.json:
        print(printable_json(report, indent=2, default=str))
    else:
        recorded = report["recorded"]
        print(printable(
            f"recorded  {recorded['decision'].upper()} at {recorded['at']} by "
            f"{', '.join(recorded['policies']) or '(no policy: default deny)'} "
            f"(revision {(recorded['policy_revision'] or '?')[:12]}); decided again now:"))
        print(text(report))
    return 0 if report["decision"] == row.decision else 1


def _fail(message: str) -> int:
    print(printable(f"cedargate: {message}"), file=sys.stderr)
    return 2
