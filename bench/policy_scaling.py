#!/usr/bin/env python3
"""Per-decision cost of cedargate's core as the policy set grows: 20 policies against 2000.

No sockets. For each size a policy directory is generated (the schema of policies/, a generated
entities.json, and a policy set of the chosen mix) and loaded by `proxy.cedar.engine.Engine`, as
`cedargate run` would. The same fixed mix of requests is then decided, call by call, three ways (four
with --baseline):

  engine   Engine.evaluate: the policy slice for the call (scope and condition indexes), the entity set,
           cedarpy.is_authorized
  before   the same, with the Engine of another git revision (--baseline REF, e.g. main), loaded into
           this process beside the current one so both are timed in the same interleaved chunks
  gate     Gate.decide + Gate.finish: mapping the HTTP call, evaluating, building the verdict and
           queueing its row to a real Recorder writing to SQLite in a temp dir (its writer thread runs)
  naive    cedarpy.is_authorized against the whole PolicySet handle (no slicing), same entities

Each figure is the median (and p99) of per-call wall times, gathered in chunks that alternate between
the cells so load elsewhere on the machine hits them alike. Before timing, every request is decided
both sliced and naive and the decisions and determining policies must agree. Target: at 2000
policies a decision (engine) costs at most 3x what it costs at 20. Results go to
bench/results/policy_scaling.json, one entry per mix and sizes (a run replaces its own entry).

    .venv/bin/python bench/policy_scaling.py [--mix varied] [--sizes 20 2000] [--calls 5000] [--baseline main]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cedarpy  # noqa: E402
import yaml  # noqa: E402
from figures import write_figures  # noqa: E402

from proxy.calls.mapping import Call, MappingOptions, map_call  # noqa: E402
from proxy.cedar.engine import CedarRequest, Engine  # noqa: E402
from proxy.cedar.manifest import load_manifest, schema_text  # noqa: E402
from proxy.decision.gate import Gate  # noqa: E402
from proxy.record.store import Recorder, count_decisions, make_engine  # noqa: E402

RESULTS = REPO / "bench" / "results" / "policy_scaling.json"
TARGET_RATIO = 3.0

METHODS = ("get", "post", "put", "delete")
TEAMS = [f"team-{i}" for i in range(12)]
AGENTS = [(f"agent-{i}", TEAMS[i % len(TEAMS)]) for i in range(60)]
HOSTS = [f"host-{i}.svc.example" for i in range(120)]
TAGS = ("dev", "staging", "production-critical", "pci", "frozen", "eu", "us")
SERVICES = 50  # paths are /v1/svc-0/... to /v1/svc-49/...

# The policy mixes: (weight, kind). In "varied", most policies name one action, as the example set
# does; some name an action group (`in Action::"read"`) or a list, which the engine's slices keep for
# every action. "single-action" drops those: the best case for slicing by action. "per-customer": every
# policy is on the manifest action `process_refund` with one scope, told apart only by `when` tests on
# the customer (refund limits, currency rules): what the scope index alone cannot slice.
MIXES = {
    "varied": [
        (40, "permit-team-action-path"),
        (15, "permit-team-action-tag"),
        (15, "forbid-action-production-admin"),
        (10, "permit-agent-action-host"),
        (10, "permit-team-read-group"),
        (5, "forbid-write-group-frozen"),
        (5, "forbid-team-action-list-config"),
    ],
    "single-action": [
        (50, "permit-team-action-path"),
        (20, "permit-team-action-tag"),
        (20, "forbid-action-production-admin"),
        (10, "permit-agent-action-host"),
    ],
    "per-customer": [
        (60, "permit-customer-refund-limit"),
        (25, "forbid-customer-refund-currency"),
        (15, "permit-customer-refund-vip"),
    ],
}
PAYMENTS = "api.payments.example"
CURRENCIES = ("EUR", "USD", "GBP")
# Calls name the first customers, which every size has rules for (two customers a rule at 20 policies,
# two rules a customer at 2000), and some customers no rule names.
CALLED_CUSTOMERS = 10


# --------------------------------------------------------------------------------------------------
# Generated policy directory
# --------------------------------------------------------------------------------------------------


def generate_entities(rng: random.Random) -> list[dict]:
    entities: list[dict] = [{"uid": {"type": "Team", "id": t}, "attrs": {}, "parents": []} for t in TEAMS]
    entities += [
        {"uid": {"type": "Agent", "id": a}, "attrs": {}, "parents": [{"type": "Team", "id": t}]}
        for a, t in AGENTS
    ]
    for env in ("production", "staging", "development"):
        entities.append({"uid": {"type": "Environment", "id": env}, "attrs": {}, "parents": []})
    for i, host in enumerate(HOSTS):
        env = ("production", "staging", "development")[i % 3]
        tags = sorted(rng.sample(TAGS, rng.randint(0, 3)))
        entities.append(
            {
                "uid": {"type": "Host", "id": host},
                "attrs": {"tags": tags},
                "parents": [{"type": "Environment", "id": env}],
            }
        )
    return entities


def customers(size: int) -> int:
    return max(CALLED_CUSTOMERS, size // 2)


def generate_policy(i: int, kind: str, rng: random.Random, size: int) -> str:
    team = rng.choice(TEAMS)
    method = rng.choice(METHODS)
    svc = rng.randrange(SERVICES)
    pid = f"gen-{i:05d}-{kind}"
    if kind == "permit-team-action-path":
        return (
            f'@id("{pid}")\npermit (principal in Team::"{team}", action == Action::"{method}", resource)\n'
            f'when {{ context.path like "/v1/svc-{svc}/*" }};\n'
        )
    if kind == "permit-team-action-tag":
        tag = rng.choice(("dev", "staging", "eu", "us"))
        return (
            f'@id("{pid}")\npermit (principal in Team::"{team}", action == Action::"{method}", resource)\n'
            f'when {{ resource.tags.contains("{tag}") && context.path like "/v1/svc-{svc}/*" }};\n'
        )
    if kind == "forbid-action-production-admin":
        return (
            f'@id("{pid}")\n@reason("Admin calls to svc-{svc} in production need a human.")\n'
            f'forbid (principal, action == Action::"{method}", resource in Environment::"production")\n'
            f'when {{ context.path like "/v1/svc-{svc}/admin/*" }};\n'
        )
    if kind == "permit-agent-action-host":
        agent = rng.choice(AGENTS)[0]
        host = rng.choice(HOSTS)
        return (
            f'@id("{pid}")\npermit (principal == Agent::"{agent}", action == Action::"{method}", '
            f'resource == Host::"{host}")\nwhen {{ context.path like "/v1/svc-{svc}/*" }};\n'
        )
    if kind == "permit-team-read-group":
        return (
            f'@id("{pid}")\npermit (principal in Team::"{team}", action in Action::"read", resource)\n'
            f'when {{ context.path like "/v1/svc-{svc}/*" && !resource.tags.contains("pci") }};\n'
        )
    if kind == "forbid-write-group-frozen":
        return (
            f'@id("{pid}")\n@reason("svc-{svc} is frozen on tagged hosts.")\n'
            f'forbid (principal, action in Action::"write", resource)\n'
            f'when {{ resource.tags.contains("frozen") && context.path like "/v1/svc-{svc}/*" }};\n'
        )
    if kind == "forbid-team-action-list-config":
        return (
            f'@id("{pid}")\n@reason("{team} does not change svc-{svc} configuration.")\n'
            f'forbid (principal in Team::"{team}", action in [Action::"put", Action::"delete"], resource)\n'
            f'when {{ context.path like "/v1/svc-{svc}/config/*" }};\n'
        )
    customer = f"cust-{rng.randrange(customers(size))}"
    refunds = 'principal, action == Action::"process_refund", resource'
    if kind == "permit-customer-refund-limit":
        limit = f'decimal("{rng.randint(50, 500)}.00")'
        return (
            f'@id("{pid}")\npermit ({refunds})\n'
            f'when {{ context.customer == "{customer}" && context.amount.lessThan({limit}) }};\n'
        )
    if kind == "forbid-customer-refund-currency":
        return (
            f'@id("{pid}")\n@reason("{customer} is refunded in its own currency only.")\nforbid ({refunds})\n'
            f'when {{ context.customer == "{customer}" && context.currency == "{rng.choice(CURRENCIES)}" }};\n'
        )
    if kind == "permit-customer-refund-vip":
        return (
            f'@id("{pid}")\npermit ({refunds})\n'
            f'when {{ "{customer}" == context.customer && principal in Team::"{team}" }};\n'
        )
    raise ValueError(kind)


def write_refund_manifest(directory: Path) -> None:
    """The payments API of policies/actions.yaml, with the customer among the typed body fields."""
    fields = {"order_id": {"from": "path", "type": "String"}, "customer": {"from": "body", "type": "String"},
              "amount": {"from": "body", "type": "Decimal"}, "currency": {"from": "body", "type": "String"}}
    route = {"route": "POST /v1/refunds/{order_id}", "action": "process_refund", "severity": "high",
             "reversible": False, "groups": ["write"], "fields": fields}
    (directory / "actions.yaml").write_text(yaml.safe_dump({"hosts": [{"host": PAYMENTS, "routes": [route]}]}))
    manifest = load_manifest(directory)
    assert manifest is not None
    (directory / "actions.cedarschema").write_text(schema_text(manifest))


def generate_policy_dir(directory: Path, size: int, seed: int, mix: str = "varied") -> Counter:
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    shutil.copy(REPO / "policies" / "schema.cedarschema", directory / "schema.cedarschema")
    (directory / "entities.json").write_text(json.dumps(generate_entities(random.Random(seed)), indent=1))
    if mix == "per-customer":
        write_refund_manifest(directory)
    kinds = [k for _, k in MIXES[mix]]
    weights = [w for w, _ in MIXES[mix]]
    # Every kind appears even in a small set; the rest follow the weights.
    chosen = (kinds * (size // len(kinds) + 1))[: min(size, len(kinds))]
    chosen += rng.choices(kinds, weights=weights, k=size - len(chosen))
    rng.shuffle(chosen)
    texts = [generate_policy(i, kind, rng, size) for i, kind in enumerate(chosen)]
    # Split over a few files, as an operator would.
    files = max(1, min(8, size // 100))
    for f in range(files):
        (directory / f"generated-{f}.cedar").write_text("\n".join(texts[f::files]))
    return Counter(chosen)


def generate_calls(count: int, seed: int, mix: str = "varied") -> list[Call]:
    rng = random.Random(seed)
    if mix == "per-customer":
        return [refund_call(rng) for _ in range(count)]
    calls = []
    for _ in range(count):
        agent = rng.choice(AGENTS)[0]
        method = rng.choices(METHODS, weights=(6, 2, 1, 1))[0].upper()
        svc = rng.randrange(SERVICES)
        tail = rng.choice(("items", "items/42", "admin/users", "config/limits", "status"))
        calls.append(
            Call(
                agent=agent,
                method=method,
                scheme="https",
                host=rng.choice(HOSTS),
                port=443,
                path=f"/v1/svc-{svc}/{tail}",
                query=rng.choice(("", "page=2")),
                headers={"User-Agent": "agent/1.0", "Accept": "application/json"},
            )
        )
    return calls


def refund_call(rng: random.Random) -> Call:
    called = rng.randrange(CALLED_CUSTOMERS + 2)  # the last two: customers no rule names
    customer = f"cust-{called}" if called < CALLED_CUSTOMERS else f"walk-in-{called}"
    body = {"customer": customer, "amount": round(rng.uniform(1, 900), 2), "currency": rng.choice(CURRENCIES)}
    return Call(
        agent=rng.choice(AGENTS)[0],
        method="POST",
        scheme="https",
        host=PAYMENTS,
        port=443,
        path=f"/v1/refunds/o-{rng.randrange(10**6)}",
        query="",
        headers={"User-Agent": "agent/1.0", "Content-Type": "application/json"},
        body=json.dumps(body).encode(),
    )


def baseline_engine(ref: str, tmp: Path) -> type:
    """The `Engine` class of git revision `ref`, loaded beside this checkout's.

    The revision's `proxy` package is imported while this checkout's modules are set aside, then set
    aside itself: its functions keep their own module globals, so both engines run in one process.
    """
    code = tmp / "baseline"
    code.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "proxy"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive.stdout, check=True)

    def ours() -> dict:
        return {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "proxy"}

    current = ours()
    sys.path.insert(0, str(code))
    try:
        from proxy.cedar.engine import Engine as Baseline
    finally:
        sys.path.remove(str(code))
        ours()  # the baseline's modules, dropped from sys.modules (its classes keep them alive)
        sys.modules.update(current)
    return Baseline


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


class Timer:
    """Per-call wall times of fn(item), cycling through items, gathered over several chunks.

    Chunks of the different cells are run interleaved, so a burst of other load on the machine falls
    on every cell alike rather than on whichever cell ran then. The GC runs as in a live process.
    """

    def __init__(self, fn, items: list, labels: list[str] | None = None) -> None:
        self.fn = fn
        self.items = items
        self.labels = labels  # per item, e.g. its action: medians are also given per label
        self.next = 0
        self.samples: list[int] = []
        self.positions: list[int] = []

    def run(self, calls: int, record: bool = True) -> None:
        fn, items, n = self.fn, self.items, len(self.items)
        clock = time.perf_counter_ns
        append = self.samples.append if record else (lambda _x: None)
        place = self.positions.append if record else (lambda _x: None)
        start = self.next
        for i in range(start, start + calls):
            item = items[i % n]
            t0 = clock()
            fn(item)
            append(clock() - t0)
            place(i % n)
        self.next = start + calls

    def stats(self) -> dict:
        samples = sorted(self.samples)
        calls = len(samples)
        figures = {
            "calls": calls,
            "median_us": samples[calls // 2] / 1000,
            "p99_us": samples[min(calls - 1, int(calls * 0.99))] / 1000,
            "mean_us": sum(samples) / calls / 1000,
        }
        if self.labels:
            by_label: dict[str, list[int]] = {}
            for sample, position in zip(self.samples, self.positions, strict=True):
                by_label.setdefault(self.labels[position], []).append(sample)
            figures["median_us_by_action"] = {
                label: sorted(s)[len(s) // 2] / 1000 for label, s in sorted(by_label.items())
            }
            # Reads (GETs, the mix's majority, with the smallest slices) and writes apart: a median of the
            # whole mix is a read's, and says nothing of what writes cost.
            groups: dict[str, list[int]] = {}
            for label, s in by_label.items():
                groups.setdefault("reads" if label in READS else "writes", []).extend(s)
            figures["by_kind"] = {kind: {"calls": len(s), "median_us": sorted(s)[len(s) // 2] / 1000,
                                         "mean_us": sum(s) / len(s) / 1000}
                                  for kind, s in sorted(groups.items())}
        return figures


READS = frozenset({"get", "head", "options", "read"})  # actions that change nothing


def slice_sizes(engine: Engine, requests) -> dict[str, float]:
    """Mean number of policies a call of each action is evaluated against (the engine's own indexes)."""
    sizes: dict[str, list[int]] = {}
    snapshot = engine.snapshot
    for request in requests:
        signature = snapshot.conditions.signature(request.context)
        ids = snapshot.slice_for(request.principal, request.action, request.resource, signature).ids
        sizes.setdefault(request.action[1], []).append(len(ids))
    return {action: round(sum(n) / len(n), 1) for action, n in sizes.items()}


def mismatches(evaluate, decide_naive, requests, decisions: Counter | None = None) -> list[dict]:
    """The requests on which `evaluate` (sliced) and the whole set decide differently."""
    found = []
    for request in requests:
        sliced = evaluate(request)
        full = decide_naive(request)
        if decisions is not None:
            decisions[sliced.decision] += 1
        same = (
            sliced.decision == full.decision.value
            and sorted(sliced.determining) == sorted(full.diagnostics.reasons)
            and sorted(sliced.errors) == sorted(full.diagnostics.errors)
        )
        if not same:
            found.append(
                {
                    "request": request.as_cedarpy(),
                    "sliced": [sliced.decision, sliced.determining],
                    "full": [full.decision.value, full.diagnostics.reasons],
                }
            )
    return found


def naive(engine: Engine):
    def decide(request: CedarRequest):
        snap = engine.snapshot
        return cedarpy.is_authorized(
            request.as_cedarpy(),
            snap.bundle.policy_set,
            snap.entities_for(request.principal, request.resource),
        )

    return decide


class Setup:
    """One policy set, loaded and checked, with its timers; `close` stops what it started."""

    def __init__(self, size: int, tmp: Path, args, baseline: type | None = None) -> None:
        policy_dir = tmp / f"policies-{size}"
        self.mix = generate_policy_dir(policy_dir, size, seed=args.seed + size, mix=args.mix)
        started = time.perf_counter()
        self.engine = engine = Engine(policy_dir)
        self.load_s = time.perf_counter() - started
        self.recorder: Recorder | None = None
        options = MappingOptions()
        calls = generate_calls(args.distinct, seed=args.seed, mix=args.mix)
        requests = [map_call(c, options, engine.snapshot.bundle.manifest) for c in calls]
        self.requests = requests
        self.distinct = len(requests)

        # The slices must decide exactly as the whole set does. (This also builds every slice.)
        decide_naive = naive(engine)
        self.decisions: Counter = Counter()
        self.mismatches = mismatches(engine.evaluate, decide_naive, requests, self.decisions)
        self.before = baseline(policy_dir) if baseline else None
        self.before_mismatches = mismatches(self.before.evaluate, decide_naive, requests) if self.before else []

        self.recorder = Recorder(make_engine(f"sqlite:///{tmp / f'decisions-{size}.db'}"))
        gate = Gate(engine, self.recorder, options)

        # The calls repeat, so empty the engine's decision cache first: this measures deciding, not
        # remembering (a cache hit costs the same whatever the number of policies).
        def evaluate_uncached(request: CedarRequest):
            engine.snapshot.decisions.clear()
            return engine.evaluate(request)

        def decide_and_record(call: Call) -> None:
            engine.snapshot.decisions.clear()
            gate.finish(gate.decide(call), 200)

        actions = [request.action[1] for request in requests]
        self.timers = {
            "engine": Timer(evaluate_uncached, requests, actions),
            "gate": Timer(decide_and_record, calls),
            "naive": Timer(decide_naive, requests),
        }
        if self.before:
            before = self.before

            def evaluate_before_uncached(request: CedarRequest):
                before.snapshot.decisions.clear()
                return before.evaluate(request)

            self.timers["before"] = Timer(evaluate_before_uncached, requests, actions)

    def result(self, expected_rows: int) -> dict:
        assert self.recorder is not None
        flushed = self.recorder.flush(30)
        rows = sum(count_decisions(self.recorder.engine).values())
        return {
            "policies": len(self.engine.snapshot.bundle.policies),
            "policy_mix": dict(sorted(self.mix.items())),
            "slice_sizes": slice_sizes(self.engine, self.requests),
            "load_s": round(self.load_s, 3),
            "distinct_requests": self.distinct,
            "decisions": dict(self.decisions),
            "sliced_vs_full_mismatches": len(self.mismatches),
            "mismatch_examples": self.mismatches[:3],
            **({"before_sliced_vs_full_mismatches": len(self.before_mismatches)} if self.before else {}),
            "timings": {name: timer.stats() for name, timer in self.timers.items()},
            "recorder": {"flushed": flushed, "rows": rows, "expected_rows": expected_rows},
        }

    def close(self) -> None:
        if self.recorder:
            self.recorder.close()
        self.engine.close()
        if self.before:
            self.before.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 2000])
    parser.add_argument("--calls", type=int, default=5000, help="timed decisions per size and method")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--chunks", type=int, default=10, help="interleaved chunks the calls are split into")
    parser.add_argument("--distinct", type=int, default=500, help="distinct requests cycled through")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mix", choices=sorted(MIXES), default="varied", help="policy mix (see MIXES)")
    parser.add_argument("--baseline", metavar="REF", help="also time the Engine of this git revision (e.g. main)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)

    started = time.monotonic()
    load_at_start = os.getloadavg()
    if load_at_start[0] > 0.5:
        print(
            f"note: load average {load_at_start[0]:.2f} before starting: other work on this machine "
            "makes the figures noisier",
            flush=True,
        )
    results = {}
    methods = ("engine", "before", "gate", "naive") if args.baseline else ("engine", "gate", "naive")
    with tempfile.TemporaryDirectory(prefix="cedargate-policy-bench-") as td, ExitStack() as stack:
        baseline = baseline_engine(args.baseline, Path(td)) if args.baseline else None
        setups = {}
        for size in args.sizes:
            print(
                f"{size} policies: generating, loading, checking slices against the whole set...", flush=True
            )
            setups[size] = Setup(size, Path(td), args, baseline)
            stack.callback(setups[size].close)
        cells = [(size, name) for size in args.sizes for name in methods]
        for size, name in cells:
            setups[size].timers[name].run(args.warmup, record=False)
        per_chunk = -(-args.calls // args.chunks)
        print(f"timing {args.calls} calls per cell in {args.chunks} interleaved chunks...", flush=True)
        for chunk in range(args.chunks):
            calls = max(0, min(per_chunk, args.calls - chunk * per_chunk))
            for size, name in cells if chunk % 2 == 0 else reversed(cells):
                setups[size].timers[name].run(calls)
                # Let the recorder write its backlog now, so it does not compete with the next cell.
                setups[size].recorder.flush(30)
        for size, setup in setups.items():
            results[str(size)] = setup.result(expected_rows=args.warmup + args.calls)
    elapsed = time.monotonic() - started

    small, large = str(min(args.sizes)), str(max(args.sizes))
    ratios = {
        method: results[large]["timings"][method]["median_us"]
        / results[small]["timings"][method]["median_us"]
        for method in methods
    }
    mean_ratios = {
        method: results[large]["timings"][method]["mean_us"] / results[small]["timings"][method]["mean_us"]
        for method in methods
    }
    kind_ratios = {
        f"{method} {kind} {stat}": results[large]["timings"][method]["by_kind"][kind][stat]
        / results[small]["timings"][method]["by_kind"][kind][stat]
        for method in methods if "by_kind" in results[large]["timings"][method]
        for kind in results[large]["timings"][method]["by_kind"]
        if kind in results[small]["timings"][method].get("by_kind", {})
        for stat in ("median_us", "mean_us")
    }
    saved = {
        size: 1 - r["timings"]["engine"]["median_us"] / r["timings"]["naive"]["median_us"]
        for size, r in results.items()
    }
    check = {
        "target": f"a decision with {large} policies costs at most {TARGET_RATIO}x one with {small} "
        "(Engine.evaluate)",
        "measured": round(ratios["engine"], 2),
        "meets": ratios["engine"] <= TARGET_RATIO,
    }
    versions = {}
    for dist in ("cedarpy", "mitmproxy", "sqlalchemy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    run = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "statistic": "median and p99 of per-call wall time over the timed calls",
        "calls_per_cell": args.calls,
        "warmup_per_cell": args.warmup,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_start": load_at_start,
            "loadavg_at_end": os.getloadavg(),
        },
        "versions": versions,
        "mix": args.mix,
        "mix_weights": {k: w for w, k in MIXES[args.mix]},
        "baseline": args.baseline and {
            "ref": args.baseline,
            "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", args.baseline],
                                     capture_output=True, text=True, check=True).stdout.strip(),
        },
        "results": results,
        "ratio_large_to_small": {k: round(v, 2) for k, v in ratios.items()},
        "ratio_large_to_small_of_means": {k: round(v, 2) for k, v in mean_ratios.items()},
        "ratio_large_to_small_reads_and_writes": {k: round(v, 2) for k, v in kind_ratios.items()},
        "slicing_saves": {k: round(v, 3) for k, v in saved.items()},
        "check": check,
        "elapsed_s": round(elapsed, 1),
    }
    # One entry per mix and sizes, so the latest figures of each stand side by side in one file.
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = previous.get("runs", {}) if previous.get("benchmark") == "policy_scaling" else {}
    entry = f"{args.mix} {' '.join(map(str, args.sizes))}"
    write_figures(args.out, {"benchmark": "policy_scaling", "runs": {**runs, entry: run}})

    print()
    print(
        f"per-decision wall time, median (p99) of {args.calls} calls over {args.distinct} distinct requests"
    )
    shown_action = "get" if args.mix != "per-customer" else "process_refund"
    header = f"{'policies':>8} {'evaluated/' + shown_action:>24} " + " ".join(f"{m + ' us':>16}" for m in methods)
    print(header + f" {'slicing saves':>13}")
    print("-" * (len(header) + 14))
    for size, r in results.items():
        t = r["timings"]
        cells_shown = " ".join(f"{t[m]['median_us']:.1f} ({t[m]['p99_us']:.0f})".rjust(16) for m in methods)
        in_slice = (r["slice_sizes"] or {}).get(shown_action, "?")
        print(f"{size:>8} {in_slice:>24} {cells_shown} {saved[size]:>12.0%}")
    print(f"{large}/{small} ratio of medians: " + ", ".join(f"{m} {ratios[m]:.2f}x" for m in methods))
    print(f"{large}/{small} ratio of means: " + ", ".join(f"{m} {mean_ratios[m]:.2f}x" for m in methods))
    for key, value in kind_ratios.items():
        print(f"  {key}: {value:.2f}x")
    by_action = {m: {size: r["timings"][m]["median_us_by_action"] for size, r in results.items()}
                 for m in ("engine", "before") if m in methods}
    for action in by_action["engine"][large]:
        shown = [f"{m} {by[large][action]:.1f} us ({by[large][action] / by[small][action]:.2f}x {small})"
                 for m, by in by_action.items() if action in by[small]]
        print(f"  {action} at {large}: " + ", ".join(shown))
    for size, r in results.items():
        print(
            f"{size} policies: loaded in {r['load_s']:.2f} s; "
            f"policies evaluated per call {r['slice_sizes']}; "
            f"decisions {r['decisions']}; "
            f"sliced vs full mismatches {r['sliced_vs_full_mismatches']}; "
            f"recorded {r['recorder']['rows']}/{r['recorder']['expected_rows']} rows"
        )
    print(
        f"{check['target']}: measured {check['measured']}x -> "
        f"meets target: {'yes' if check['meets'] else 'no'}"
    )
    if any(r["sliced_vs_full_mismatches"] or r.get("before_sliced_vs_full_mismatches") for r in results.values()):
        print("WARNING: sliced and full policy sets decided differently; see mismatch_examples in the JSON")
    shown = args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out
    print(f"written {shown} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
