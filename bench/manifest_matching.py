#!/usr/bin/env python3
"""What naming a call's action costs next to deciding it: manifest matching with 500 routes vs Cedar.

Builds a policy directory with an actions.yaml of 500 routes (10 hosts x 50 routes, each with path
parameters and typed body fields), writes its Cedar schema with the same code `cedargate schema` uses,
and a policy per action. Then, for calls spread over the routes, times per call:
  match     Manifest.match + extract_fields (what the mapping adds on a manifest host)
  mapping   map_call as a whole, with the manifest
  decision  Engine.evaluate on the mapped request, its decision cache emptied first (what a call the
            engine has not seen before costs)
  cached    Engine.evaluate when the same request was decided before (the cache's hit)
Target: matching costs less than the (uncached) decision. Figures go to bench/results/manifest_matching.json.

    .venv/bin/python bench/manifest_matching.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from figures import interleaved, summary, write_figures  # noqa: E402

from proxy.calls.mapping import Call, MappingOptions, map_call  # noqa: E402
from proxy.cedar.engine import Engine  # noqa: E402
from proxy.cedar.manifest import extract_fields, load_manifest, schema_text  # noqa: E402

RESULTS = REPO / "bench" / "results" / "manifest_matching.json"
HOSTS, ROUTES_PER_HOST = 10, 50


def build(root: Path) -> Path:
    policy_dir = root / "policies"
    shutil.copytree(REPO / "policies", policy_dir,
                    ignore=shutil.ignore_patterns("tests", "payments.cedar", "github.cedar", "actions.*"))
    hosts, policies = [], []
    for h in range(HOSTS):
        routes = []
        for r in range(ROUTES_PER_HOST):
            action = f"svc{h}_op{r}"
            routes.append({
                "route": f"POST /v{r % 3 + 1}/svc-{h}/res-{r}/{{item_id}}/op",
                "action": action, "severity": "high" if r % 5 == 0 else "low", "groups": ["write"],
                "fields": {"item_id": {"from": "path"}, "amount": {"from": "body", "type": "Decimal"},
                           "note": {"from": "body", "type": "String", "required": False}},
            })
            policies.append(f'@id("{action}-ok")\npermit (principal in Team::"ops", action == Action::"{action}", '
                            f"resource)\nwhen {{ context.amount.lessThan(decimal(\"{100 + r}.0\")) }};\n")
        hosts.append({"host": f"api-{h}.example", "routes": routes})
    (policy_dir / "actions.yaml").write_text(yaml.safe_dump({"hosts": hosts}))
    (policy_dir / "actions.cedarschema").write_text(schema_text(load_manifest(policy_dir)))
    (policy_dir / "generated.cedar").write_text("\n".join(policies))
    return policy_dir



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(build(Path(tmp)))
        manifest = engine.snapshot.bundle.manifest
        calls = [
            Call("ops-bot", "POST", "https", f"api-{n % HOSTS}.example", 443,
                 f"/v{(n % ROUTES_PER_HOST) % 3 + 1}/svc-{n % HOSTS}/res-{n % ROUTES_PER_HOST}/it-{n}/op", "",
                 {"content-type": "application/json"}, json.dumps({"amount": n % 150, "note": "x"}).encode())
            for n in range(1000)
        ]
        options = MappingOptions()
        requests = [map_call(c, options, manifest) for c in calls]
        assert all(r.action[1].startswith("svc") for r in requests)
        bodies = [json.loads(c.body) for c in calls]

        def match(i: int) -> None:
            c = calls[i]
            _, found = manifest.match(c.host, c.method, c.path)
            extract_fields(found, {}, bodies[i])

        repeat = max(1, args.calls // len(calls))
        indexes = list(range(len(calls)))
        for i in indexes:  # warm the slices and caches, as a running proxy has them
            engine.evaluate(requests[i])
        decisions = engine.snapshot.decisions

        def decide_uncached(i: int) -> None:
            decisions.clear()
            engine.evaluate(requests[i])

        cells = interleaved({
            "match": (match, indexes),
            "mapping": (lambda i: map_call(calls[i], options, manifest), indexes),
            "decision": (decide_uncached, indexes),
            "cached": (lambda i: engine.evaluate(requests[i]), indexes),
        }, repeat)
    figures = summary(cells)
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "routes": HOSTS * ROUTES_PER_HOST,
        "calls_timed": len(cells["match"]),
        "figures": figures,
        "target": "matching (match + typed field extraction) costs less than the decision",
        "meets_target": figures["match"]["median_us"] < figures["decision"]["median_us"],
    }
    write_figures(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
