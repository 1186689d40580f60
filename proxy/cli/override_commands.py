"""`cedargate overrides list|show|approve|deny`: the override API from a terminal.

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
from typing import Any

from proxy.oversight.changes import value_from_text
from proxy.vocabulary.printable import printable, printable_json

TOKEN_ENV = "CEDARGATE_APPROVER_TOKEN"


def add_overrides_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    overrides = subparsers.add_parser("overrides", help="review override requests through the running API")
    overrides.add_argument("--api", default=os.environ.get("CEDARGATE_API", "http://127.0.0.1:8081"),
                           help="the override API's base URL (default $CEDARGATE_API or http://127.0.0.1:8081)")
    overrides.add_argument("--token-env", default=TOKEN_ENV,
                           help=f"environment variable holding your approver token (default {TOKEN_ENV})")
    actions = overrides.add_subparsers(dest="overrides_command", required=True)
    listing = actions.add_parser("list", help="override requests, newest first")
    listing.add_argument("--status", choices=["pending", "granted", "denied", "expired", "released",
                                               "release_refused", "grant_expired"])
    listing.add_argument("--agent")
    listing.add_argument("--action")
    actions.add_parser("show", help="everything about one request").add_argument("id")
    for verb in ("approve", "deny"):
        parser = actions.add_parser(verb, help=f"{verb} a pending request")
        parser.add_argument("id")
        parser.add_argument("--reason", required=True, help="why; kept in the record and shown to the agent")
        if verb == "approve":
            parser.add_argument("--change", action="append", default=[], metavar="FIELD=VALUE",
                                help="approve the call with this value changed (repeatable), e.g. --change amount=50; "
                                     "`show` lists the request's editable_fields")


def run_overrides_command(args: argparse.Namespace) -> int:
    token = os.environ.get(args.token_env)
    if not token:
        print(f"cedargate: set {args.token_env} to your approver token", file=sys.stderr)
        return 2
    base = args.api.rstrip("/")
    command = args.overrides_command
    if command == "list":
        query = {k: v for k, v in (("status", args.status), ("agent", args.agent), ("action", args.action)) if v}
        ok, body = _call("GET", f"{base}/overrides?{urllib.parse.urlencode(query)}", token)
        if ok:
            for item in body:
                shown = {k: printable(str(item[k])) for k in ("id", "status", "agent", "method", "url")}
                print(f"{shown['id']}  {shown['status']:<15} {shown['agent']:<12} {shown['method']:<6} "
                      f"{shown['url']}")
                print(f"    {printable('; '.join(item['reasons']))}")
            if not body:
                print("no override requests")
    elif command == "show":
        ok, body = _call("GET", f"{base}/overrides/{args.id}", token)
        if ok:
            print(printable_json(body, indent=2))
    else:
        payload: dict[str, Any] = {"reason": args.reason}
        ok, body = True, None
        if getattr(args, "change", None):
            ok, body = _changes(base, args.id, token, args.change)
            payload["changes"] = body
        if ok:
            ok, body = _call("POST", f"{base}/overrides/{args.id}/{command}", token, payload)
        if ok:
            changed = f" (changed: {json.dumps(body['changes'])})" if body.get("changes") else ""
            print(printable(f"{body['id']}: {body['status']}{changed}"))
    if not ok:
        message = f"cedargate: {body.get('status')} {body.get('title')}: {body.get('detail')}"
        print(printable(message), file=sys.stderr)
        return 1
    return 0


def _changes(base: str, override_id: str, token: str, pairs: list[str]) -> tuple[bool, Any]:
    """`FIELD=VALUE` pairs as the approval's changes, each value typed as the request's field is."""
    ok, shown = _call("GET", f"{base}/overrides/{override_id}", token)
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


def _call(method: str, url: str, token: str, payload: dict[str, Any] | None = None) -> tuple[bool, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "application/json",
    })
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return True, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return False, json.loads(exc.read())
        except ValueError:
            return False, {"status": exc.code, "title": exc.reason, "detail": ""}
    except urllib.error.URLError as exc:
        return False, {"status": "-", "title": "cannot reach the API", "detail": f"{url}: {exc.reason}"}
