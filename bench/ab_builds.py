#!/usr/bin/env python3
"""Two builds of cedargate side by side, next to plain mitmdump: what a change did to one proxy process.

`proxy_overhead.py` measures this tree against mitmdump; this script adds the same tree at another
commit (`--baseline`, default main), taken out with `git archive` into a temporary directory and started
by the same launcher with that directory first on PYTHONPATH, so the two builds share this venv, the
example policies (a copy of this tree's), the load clients and the upstream. Each round measures
mitmdump, the baseline and this tree back to back (the order rotated each round) on every cell
(scheme x concurrency, unique calls: every call mapped and evaluated), so a ratio of one round is a pair
taken under the same conditions. It reports, per cell, min-median-max over the rounds of this tree's
throughput and CPU per request against the baseline's and against mitmdump's, the CPU per request of
each process (user+system, all threads) and of its event loop's thread alone (the process's main
thread: cedargate's record writer and other threads left out), and the load average at the start and
the end. With `--workers N` both builds run as `cedargate run --workers N` (the loop CPU is then the
workers' and the supervisor's main threads summed), and each round records how the load client's
connections fell on the workers.

    .venv/bin/python bench/ab_builds.py --baseline main --requests 2000 --rounds 3 [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import proxy_overhead as po
from figures import write_figures

REPO = po.REPO
RESULTS = REPO / "bench" / "results" / "ab_builds.json"


def export(ref: str, into: Path) -> str:
    """The tree of `ref` written under `into`; its full commit id."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    into.mkdir()
    archive = subprocess.Popen(["git", "archive", commit], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {ref} failed")
    return commit


def start_build(procs: po.Processes, tmp: Path, name: str, upstream_ca: Path, source: Path | None,
                workers: int = 1) -> po.Target:
    """cedargate from `source` (None: this tree), one process or `workers` workers."""
    saved = {variable: os.environ.get(variable) for variable in ("PYTHONPATH", "PYTHONSAFEPATH")}
    # This tree too is put first on PYTHONPATH: the venv's editable install points at the checkout it was
    # made in, which, run from another worktree, is not this one (and the results would name this one).
    source = Path(__file__).resolve().parents[1] if source is None else source
    before = saved["PYTHONPATH"]
    os.environ["PYTHONPATH"] = str(source) + (os.pathsep + before if before else "")
    # Its workers (`python -m proxy.cli.worker`, started in this tree) would import this tree's
    # `proxy` from their current directory, ahead of PYTHONPATH, in a build that does not pass -P.
    os.environ["PYTHONSAFEPATH"] = "1"
    try:
        target, _state, _gate = po.start_cedargate(procs, tmp, name, upstream_ca, workers)
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
    return target


def loop_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process's main thread (the event loop, in mitmdump and cedargate), and
    of its workers' under `--workers N`."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(loop_cpu_seconds(worker) for worker in po.workers_of(pid))


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="main", help="the commit to compare this tree with")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--schemes", nargs="+", choices=["http", "https"], default=["http", "https"])
    parser.add_argument("--workers", type=int, default=1, help="run both builds with `--workers N`")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk)")

    load_at_start = os.getloadavg()
    procs = po.Processes()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cedargate-ab-")))
        stack.callback(procs.stop_all)
        baseline_commit = export(args.baseline, tmp / "baseline-src")
        upstream = po.start_upstream(procs, tmp)
        targets = [
            po.start_mitmdump(procs, tmp, upstream.ca),
            start_build(procs, tmp, "baseline", upstream.ca, tmp / "baseline-src", args.workers),
            start_build(procs, tmp, "this-tree", upstream.ca, None, args.workers),
        ]
        url = f"http://localhost:{upstream.http_port}{po.REQUEST_PATH}"
        for t in targets:
            status, body = po.probe(t.port, url)
            if status != 200 or body != po.UPSTREAM_BODY:
                raise RuntimeError(f"{t.name}: the benchmark request got {status} {body[:300]!r}")

        def measure(scheme: str, t: po.Target, concurrency: int, count: int) -> po.CellResult:
            cpu_before, loop_before = po.tree_cpu_seconds(t.proc.pid), loop_cpu_seconds(t.proc.pid)
            workers = po.workers_of(t.proc.pid)
            sampler = po.SplitSampler(t.port, workers, concurrency) if workers and count == args.requests else None
            if scheme == "https":
                trust = ssl.create_default_context(cafile=str(t.ca))
                cell = upstream.count_connections(scheme, lambda: po.run_https(
                    t.port, upstream.https_port, True, trust, concurrency, count, True))
            else:
                cell = upstream.count_connections(scheme, lambda: po.run_wrk(
                    tmp, t.port, upstream.http_port, True, concurrency, count, True))
            cell.proxy_cpu_us_per_req = (po.tree_cpu_seconds(t.proc.pid) - cpu_before) / cell.requests * 1e6
            loop_cpu[id(cell)] = (loop_cpu_seconds(t.proc.pid) - loop_before) / cell.requests * 1e6
            if sampler is not None:
                cell.worker_connections = sampler.stop()
            return cell

        # A cell's event-loop CPU per request (us), by id: every measured cell stays alive in `raw`.
        loop_cpu: dict[int, float] = {}
        raw: dict[str, dict[str, list[po.CellResult]]] = {}
        for rnd in range(args.rounds):
            for scheme in args.schemes:
                for concurrency in args.concurrency:
                    key = f"{scheme}-unique c={concurrency}"
                    order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
                    for t in order:
                        measure(scheme, t, concurrency, args.warmup)
                        cell = measure(scheme, t, concurrency, args.requests)
                        raw.setdefault(key, {}).setdefault(t.name, []).append(cell)
                        print(f"round {rnd + 1}/{args.rounds} {key:<18} {t.name:<10} {cell.rps:7.0f} req/s  "
                              f"p50 {cell.p50_ms:6.3f} ms  "
                              f"CPU {cell.proxy_cpu_us_per_req:5.0f} us/req (loop {loop_cpu[id(cell)]:5.0f})  "
                              f"errors {cell.errors}  upstream connections {cell.upstream_connections}  "
                              f"load {os.getloadavg()[0]:.1f}"
                              + (f"  workers' connections {cell.worker_connections}"
                                 if cell.worker_connections is not None else ""), flush=True)
    load_at_end = os.getloadavg()

    cells = {}
    print(f"\nthis tree against baseline {baseline_commit[:7]} and mitmdump, per-round ratios min/median/max "
          f"(load average {load_at_start[0]:.1f} at the start, {load_at_end[0]:.1f} at the end)")
    for key, by_target in raw.items():
        new, old, mitm = by_target["this-tree"], by_target["baseline"], by_target["mitmdump"]
        cell = {
            "cpu_us_per_req": {name: round(statistics.median(c.proxy_cpu_us_per_req for c in runs))
                               for name, runs in by_target.items()},
            "loop_cpu_us_per_req": {name: round(statistics.median(loop_cpu[id(c)] for c in runs))
                                    for name, runs in by_target.items()},
            "rps": {name: round(statistics.median(c.rps for c in runs)) for name, runs in by_target.items()},
            "p50_ms": {name: round(statistics.median(c.p50_ms for c in runs), 3) for name, runs in by_target.items()},
            "errors": {name: sum(c.errors for c in runs) for name, runs in by_target.items()},
            "rps_each_round": {name: [round(c.rps) for c in runs] for name, runs in by_target.items()},
            "worker_connections_each_round": {name: [c.worker_connections for c in runs]
                                              for name, runs in by_target.items() if name != "mitmdump"},
            # Per round: one per client connection when the proxy keeps its upstream connections alive.
            "upstream_connections": {name: [c.upstream_connections for c in runs] for name, runs in by_target.items()},
        }
        for label, base in (("vs_baseline", old), ("vs_mitmdump", mitm), ("baseline_vs_mitmdump", None)):
            mine = old if base is None else new
            other = mitm if base is None else base
            cell[label] = {
                "throughput": spread([a.rps / b.rps for a, b in zip(mine, other, strict=True)]),
                "cpu_per_request": spread([a.proxy_cpu_us_per_req / b.proxy_cpu_us_per_req
                                           for a, b in zip(mine, other, strict=True)]),
                "loop_cpu_per_request": spread([loop_cpu[id(a)] / loop_cpu[id(b)]
                                                for a, b in zip(mine, other, strict=True)]),
            }
        cells[key] = cell

        def fmt(d: dict[str, float]) -> str:
            return f"{d['min']:.2f}-{d['median']:.2f}-{d['max']:.2f}x"

        print(f"{key:<18} vs baseline: throughput {fmt(cell['vs_baseline']['throughput'])}, CPU/req "
              f"{fmt(cell['vs_baseline']['cpu_per_request'])}, loop CPU/req "
              f"{fmt(cell['vs_baseline']['loop_cpu_per_request'])} | vs mitmdump: this tree "
              f"{fmt(cell['vs_mitmdump']['throughput'])} (CPU {fmt(cell['vs_mitmdump']['cpu_per_request'])}), "
              f"baseline {fmt(cell['baseline_vs_mitmdump']['throughput'])} "
              f"(CPU {fmt(cell['baseline_vs_mitmdump']['cpu_per_request'])}) | CPU us/req {cell['cpu_us_per_req']}, "
              f"loop {cell['loop_cpu_us_per_req']}, p50 ms {cell['p50_ms']}")

    write_figures(args.out, {
        "benchmark": "ab_builds",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "this_tree": po.git_commit(),
        "baseline": baseline_commit,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average": {"start": load_at_start, "end": load_at_end},
        "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "cells": cells,
    })
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
