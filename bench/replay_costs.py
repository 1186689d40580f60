#!/usr/bin/env python3
"""What keeping each decision's Cedar request and judging it by shadow policies cost per call, next to
deciding the call, on the bundled example policies (in process, CPU time, no sockets).

Timed per call:
  decide        Gate.decide of a call (mapping and the live Cedar decision), for scale
  stored        Gate.stored_request: the Cedar request as the record keeps it (redaction, canonical JSON)
  shadow        judge() by a shadow set (a copy of the live one) of a request it judged before (cached)
  shadow_new    the same for requests it has not seen: volume deletions on distinct paths, which escalate,
                so two Cedar evaluations each (the shadow's worst common case)
  replay        the replay of one recorded row: parsing the stored JSON and judging it, uncached as above
Figures go to bench/results/replay_costs.json. The end-to-end figure (the proxy's CPU per request with a
shadow set) is `bench/proxy_overhead.py --shadow`.

    .venv/bin/python bench/replay_costs.py [--calls 5000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from figures import summary, timed, write_figures  # noqa: E402

from proxy.calls.mapping import Call  # noqa: E402
from proxy.cedar.engine import CedarRequest, Engine  # noqa: E402
from proxy.decision.gate import Gate  # noqa: E402
from proxy.decision.judgement import judge  # noqa: E402

RESULTS = REPO / "bench" / "results" / "replay_costs.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        live_dir, shadow_dir = Path(tmp) / "live", Path(tmp) / "shadow"
        for target in (live_dir, shadow_dir):
            shutil.copytree(REPO / "policies", target, ignore=shutil.ignore_patterns("tests"))
        gate, shadow = Gate(Engine(live_dir), None), Engine(shadow_dir)
        listing = Call(agent="ops-bot", method="GET", scheme="http", host="localhost", port=9000,
                       path="/v1/instances", query="page=2&access_token=abc123",
                       headers={"Accept": "*/*", "User-Agent": "bench"})
        verdict = gate.decide(listing)
        deletion = gate.decide(replace(listing, method="DELETE", path="/v1/volumes/v-0", query=""))
        assert deletion.request is not None and deletion.outcome.value == "escalate"
        unseen = [replace(deletion.request, context={**deletion.request.context, "path": f"/v1/volumes/v-{i}"})
                  for i in range(args.calls)]
        stored = [gate.stored_request(replace(deletion, request=r)) for r in unseen]
        replay_engine = Engine(shadow_dir)

        def replayed(text: str) -> None:
            row = json.loads(text)
            uid = lambda v: (v["type"], v["id"])  # noqa: E731
            request = CedarRequest(uid(row["principal"]), uid(row["action"]), uid(row["resource"]), row["context"])
            judge(replay_engine, request, replay_engine.snapshot)

        cells = {
            "decide": timed(lambda _: gate.decide(listing), range(args.calls)),
            "stored": timed(lambda _: gate.stored_request(verdict), range(args.calls)),
            "shadow": timed(lambda _: judge(shadow, verdict.request, shadow.snapshot), range(args.calls)),
            "shadow_new": timed(lambda r: judge(shadow, r, shadow.snapshot), unseen),
            "replay": timed(replayed, stored),
        }
    figures = {
        "benchmark": "replay_costs", "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "calls": args.calls, "stored_request_bytes": len(gate.stored_request(verdict) or ""),
        "per_call": summary(cells),
    }
    write_figures(args.out, figures)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
