#!/usr/bin/env python3
"""What reading MCP messages costs next to deciding them: an endpoint with 500 tools.

Builds a policy directory whose manifest has one MCP endpoint with 500 tools (typed arguments on each),
a permit for the server and a forbid for every tenth tool (half of them escalatable, some conditional).
Times per call:
  mapping    map_call on a tools/call POST: JSON-RPC parsing, tool lookup, typed arguments
  decision   Engine.evaluate on the mapped request, its decision cache emptied first
  list_cold  Gate.visible_tools over all 500 tools on a fresh snapshot (the first tools/list per agent
             and policy revision: one Cedar evaluation per tool)
  list_warm  the same once those answers are cached (every later tools/list)
Target: mapping costs less than the decision. Figures go to bench/results/mcp_mapping.json.

    .venv/bin/python bench/mcp_mapping.py [--calls 20000]
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
from proxy.cedar.engine import Engine, Snapshot  # noqa: E402
from proxy.cedar.manifest import load_manifest, schema_text  # noqa: E402
from proxy.decision.gate import Gate  # noqa: E402

RESULTS = REPO / "bench" / "results" / "mcp_mapping.json"
TOOLS = 500


def build(root: Path) -> Path:
    policy_dir = root / "policies"
    shutil.copytree(REPO / "policies", policy_dir, ignore=shutil.ignore_patterns("tests", "*.cedar", "actions.*"))
    tools = {f"tool_{t}": {"severity": "high" if t % 7 == 0 else "low",
                           "arguments": {"item_id": {}, "amount": {"type": "Decimal", "required": False}}}
             for t in range(TOOLS)}
    manifest = {"hosts": [{"host": "mcp.bench.example", "mcp": [{"path": "/mcp", "server": "bench", "tools": tools}]}]}
    (policy_dir / "actions.yaml").write_text(yaml.safe_dump(manifest))
    (policy_dir / "actions.cedarschema").write_text(schema_text(load_manifest(policy_dir)))
    policies = ['@id("sessions")\npermit (principal in Team::"ops", action == Action::"mcp_rpc", '
                'resource == McpServer::"bench");',
                '@id("tools")\npermit (principal in Team::"ops", action == Action::"call_tool", '
                'resource in McpServer::"bench");']
    for t in range(0, TOOLS, 10):
        condition = (' when { context.arguments has amount && context.arguments.amount.greaterThan(decimal("100.0")) }'
                     if t % 20 == 0 else "")
        escalate = '@escalate("security")\n' if t % 30 == 0 else ""
        policies.append(f'@id("no-tool-{t}")\n{escalate}forbid (principal, action == Action::"call_tool", '
                        f'resource == Tool::"bench/tool_{t}"){condition};')
    (policy_dir / "bench.cedar").write_text("\n\n".join(policies) + "\n")
    return policy_dir



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(build(Path(tmp)))
        gate = Gate(engine, recorder=None)
        manifest = engine.snapshot.bundle.manifest
        options = MappingOptions()
        calls = [
            Call("ops-bot", "POST", "https", "mcp.bench.example", 443, "/mcp", "",
                 {"content-type": "application/json", "accept": "application/json, text/event-stream"},
                 json.dumps({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": {
                     "name": f"tool_{n % TOOLS}", "arguments": {"item_id": f"it-{n}", "amount": n % 150}}}).encode())
            for n in range(1000)
        ]
        requests = [map_call(c, options, manifest) for c in calls]
        assert all(r.action == ("Action", "call_tool") for r in requests)
        for request in requests:  # warm the slices, as a running proxy has them
            engine.evaluate(request)
        decisions = engine.snapshot.decisions
        repeat = max(1, args.calls // len(calls))
        indexes = list(range(len(calls)))

        def decide_uncached(i: int) -> None:
            decisions.clear()
            engine.evaluate(requests[i])

        names = [f"tool_{t}" for t in range(TOOLS)]
        listing = calls[0]

        fresh = [Snapshot(engine.snapshot.bundle) for _ in range(5)]  # as after a reload: nothing cached

        def list_cold(i: int) -> None:
            engine._snapshot = fresh[i]
            gate.visible_tools(listing, names)

        shown = gate.visible_tools(listing, names)
        cells = interleaved({
            "mapping": (lambda i: map_call(calls[i], options, manifest), indexes),
            "decision": (decide_uncached, indexes),
        }, repeat)
        # The tools/list cells: a few slow calls each, interleaved with one another.
        cells.update(interleaved({
            "list_cold": (list_cold, range(5)),
            "list_warm": (lambda _: gate.visible_tools(listing, names), range(200)),
        }, 1, chunks=5))
    figures = summary(cells)
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tools": TOOLS,
        "tools_listed": len(shown),
        "calls_timed": len(cells["mapping"]),
        "figures": figures,
        "target": "mapping a tools/call (parse, tool lookup, typed arguments) costs less than the decision",
        "meets_target": figures["mapping"]["median_us"] < figures["decision"]["median_us"],
    }
    write_figures(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
