"""`cedargate overrides list|watch|show|approve|deny|request-info`: the override API from a terminal.

It talks to the running proxy's API rather than to the database, so a decision made here wakes the
held call at once and goes through the same checks (roles, self-approval) as any reviewer's, and
lists only what the reviewer's roles may see. Everything printed is escaped (`proxy.vocabulary.printable`): an
agent's URL cannot move the cursor, recolour or reverse what the reviewer reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from typing import Any

from proxy.cli.override_views import action_uid, chain_lines, describe
from proxy.oversight.changes import value_from_text
from proxy.oversight.overrides import OverrideStatus
from proxy.vocabulary.printable import printable, printable_json

TOKEN_ENV = "CEDARGATE_APPROVER_TOKEN"


def add_overrides_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    overrides = subparsers.add_parser("overrides", help="review override requests through the running API")
    overrides.add_argument("--api", default=os.environ.get("CEDARGATE_API", "http://127.0.0.1:8081"),
                           help="the override API's base URL (default $CEDARGATE_API or http://127.0.0.1:8081)")
    overrides.add_argument("--token-env", default=TOKEN_ENV,
                           help=f"environment variable holding your approver token (default {TOKEN_ENV})")
    actions = overrides.add_subparsers(dest="overrides_command", required=True)
    listing = actions.add_parser("list", help="the override requests you may see, with what each needs")
    listing.add_argument("--status", choices=[s.value for s in OverrideStatus])
    listing.add_argument("--agent")
    listing.add_argument("--action", type=action_uid,
                         help='the Cedar action: process_refund or Action::"process_refund"')
    listing.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    watch = actions.add_parser("watch", help="print requests as they arrive and as they are decided")
    watch.add_argument("--interval", type=_positive, default=2.0, help="seconds between looks (default 2)")
    watch.add_argument("--once", action="store_true", help="print the requests waiting now, and stop")
    actions.add_parser("show", help="everything about one request, and its conversation").add_argument("id")
    asking = actions.add_parser("request-info", help="ask the agent a question before deciding; its held call "
                                                     "is answered with it, its retry's justification answers it")
    asking.add_argument("id")
    asking.add_argument("--question", required=True, help="what the agent should answer; shown to it as it is")
    for verb in ("approve", "deny"):
        parser = actions.add_parser(verb, help=f"{verb} a pending request")
        parser.add_argument("id")
        parser.add_argument("--reason", required=True, help="why; kept in the record and shown to the agent")
        if verb == "approve":
            parser.add_argument("--change", action="append", default=[], metavar="FIELD=VALUE",
                                help="approve the call with this value changed (repeatable), e.g. --change amount=50; "
                                     "`show` lists the request's editable_fields")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def run_overrides_command(args: argparse.Namespace) -> int:
    token = os.environ.get(args.token_env)
    if not token:
        print(f"cedargate: set {args.token_env} to your approver token", file=sys.stderr)
        return 2
    api = Api(args.api, token)
    command = args.overrides_command
    if command == "watch":
        from proxy.cli.override_watch import watch

        return watch(api, args.interval, args.once)
    if command == "list":
        query = {k: v for k, v in (("status", args.status), ("agent", args.agent), ("action", args.action)) if v}
        ok, body = api.call("GET", f"/overrides?{urllib.parse.urlencode(query)}")
        if ok and args.json:
            print(printable_json(body, indent=2))
        elif ok:
            now = datetime.now(UTC)
            for item in body:
                print("\n".join(describe(item, now)))
            if not body:
                print("no override requests")
    elif command == "show":
        ok, body = api.call("GET", f"/overrides/{urllib.parse.quote(args.id)}")
        if ok:
            print(printable_json(body, indent=2))
            for line in chain_lines(body, datetime.now(UTC)):
                print(line)
            _print_conversation(body.get("conversation") or [])
    elif command == "request-info":
        ok, body = api.call("POST", f"/overrides/{urllib.parse.quote(args.id)}/request-info",
                            {"question": args.question})
        if ok:
            print(printable(f"{body['id']}: {body['status']} (asked: {args.question})"))
    else:
        payload: dict[str, Any] = {"reason": args.reason}
        ok, body = True, None
        if getattr(args, "change", None):
            ok, body = _changes(api, args.id, args.change)
            payload["changes"] = body
        if ok:
            ok, body = api.call("POST", f"/overrides/{urllib.parse.quote(args.id)}/{command}", payload)
        if ok:
            changed = f" (changed: {json.dumps(body['changes'])})" if body.get("changes") else ""
            print(printable(f"{body['id']}: {body['status']}{changed}"))
    if not ok:
        print(failure(body), file=sys.stderr)
        return 1
    return 0


def _print_conversation(messages: list[dict[str, Any]]) -> None:
    """The questions and answers as a reviewer reads them, after the request's JSON."""
    if not messages:
        return
    print("conversation:")
    for message in messages:
        said = "asks" if message["kind"] == "question" else "answers"
        print(printable(f"  {message['at']}  {message['by']} {said}: {message['text']}"))


def _changes(api: Api, override_id: str, pairs: list[str]) -> tuple[bool, Any]:
    """`FIELD=VALUE` pairs as the approval's changes, each value typed as the request's field is."""
    ok, shown = api.call("GET", f"/overrides/{urllib.parse.quote(override_id)}")
    if not ok:
        return False, shown
    kinds = {f["name"]: f["type"] for f in shown.get("editable_fields", [])}
    changes: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            return False, {"status": "-", "title": "bad --change",
                           "detail": f"{pair!r}: write FIELD=VALUE, e.g. --change amount=50"}
        changes[name.strip()] = value_from_text(text, kinds.get(name.strip()))
    return True, changes


def failure(body: Any) -> str:
    """One line for a refusal (problem+json) or an unreachable API."""
    if not isinstance(body, dict):
        body = {"detail": str(body)}
    return printable(f"cedargate: {body.get('status')} {body.get('title')}: {body.get('detail')}")


class Api:
    """The override API at `base`, with one approver's bearer token."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base.rstrip("/")
        self._token = token

    def call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> tuple[bool, Any]:
        """(True, the answer's JSON), or (False, a problem: the API's own, or one saying it is unreachable)."""
        url = f"{self.base}{path}"
        data = json.dumps(payload).encode() if payload is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self._token}", "Content-Type": "application/json",
            "Accept": "application/json",
        })
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return True, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                return False, json.loads(exc.read())
            except ValueError:
                return False, {"status": exc.code, "title": exc.reason, "detail": ""}
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            return False, {"status": "-", "title": "cannot reach the API", "detail": f"{url}: {reason}"}
