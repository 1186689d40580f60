"""`cedargate overrides watch`: a reviewer's running feed of the requests they may decide.

It polls the API's list of undecided requests (`decided=false`: pending, and those waiting on the agent
for more information) and prints what changed since its last look: a request that arrived, a vote, a
change of status, and, for a request that left the list, how it was decided (read from the request
itself). `--once` prints the requests waiting now and stops. Polling, not a stream: it needs nothing
of the API but the list and the request, and a missed look only delays a line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from proxy.cli.override_views import UNDECIDED, describe, headline, votes_text
from proxy.vocabulary.printable import printable

if TYPE_CHECKING:
    from proxy.cli.override_commands import Api

LIVE_QUERY = "/overrides?decided=false&limit=1000"


def watch(api: Api, interval: float, once: bool, looks: int | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Print changes until interrupted (or after `looks` looks: for tests). 1 if `--once` cannot reach the API."""
    seen: dict[str, dict[str, Any]] = {}
    first, unreachable = True, False
    try:
        while True:
            ok, body = api.call("GET", LIVE_QUERY)
            if not ok:
                from proxy.cli.override_commands import failure

                if once:
                    print(failure(body), file=sys.stderr)
                    return 1
                if not unreachable:  # once per outage, not once per look
                    print(f"{failure(body)} (still trying every {interval:g}s)", file=sys.stderr, flush=True)
                unreachable = True
            else:
                unreachable = False
                # Without the API's `decided` filter (an older API ignores it), keep the undecided here.
                live = {item["id"]: item for item in body if item.get("status") in UNDECIDED}
                _report(api, seen, live, first)
                if first and not live:
                    print("no override requests waiting", flush=True)
                seen, first = live, False
            if once:
                return 0
            if looks is not None:
                looks -= 1
                if looks <= 0:
                    return 0
            sleep(interval)
    except KeyboardInterrupt:
        return 0


def _report(api: Api, seen: dict[str, dict[str, Any]], live: dict[str, dict[str, Any]], first: bool) -> None:
    now = datetime.now(UTC)
    stamp = now.astimezone().strftime("%H:%M:%S")
    arrived = sorted((item for key, item in live.items() if key not in seen), key=lambda i: str(i.get("created_at")))
    for item in arrived:
        lines = describe(item, now)
        print(f"{stamp} {'waiting' if first else 'new':<8} {lines[0]}", flush=True)
        for line in lines[1:]:
            print(f"{'':<17} {line}", flush=True)
    for key, item in live.items():
        before = seen.get(key)
        if before is None:
            continue
        new_votes = (item.get("votes") or [])[len(before.get("votes") or []):]
        for vote in new_votes:
            print(f"{stamp} {'vote':<8} {printable(key)}: {votes_text({'votes': [vote]})}", flush=True)
        if item.get("status") != before.get("status"):
            print(f"{stamp} {printable(str(item.get('status'))):<8} {headline(item)}", flush=True)
    for key in [k for k in seen if k not in live]:
        ok, decided = api.call("GET", f"/overrides/{key}")
        if not ok:
            print(f"{stamp} {'gone':<8} {printable(key)}: no longer listed", flush=True)
            continue
        reason = decided.get("decided_reason")
        why = f': "{printable(str(reason))}"' if reason else ""
        print(f"{stamp} {printable(str(decided.get('status'))):<8} {headline(decided)}{why}", flush=True)
