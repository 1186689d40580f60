#!/usr/bin/env python3
"""What record-before-forward costs: a forwarded call waits until its decision row is committed.

Two measurements, side by side in one run:
  commit wait   in this process, the wait itself as the enforcer has it: `Recorder.commit(row)` awaited
                on an asyncio loop (`addons.enforcer.all_done`), on a SQLite file (and with --postgres, on
                PostgreSQL), by 1 and by 16 concurrent
                callers (group commit: the rows that arrive while one commit runs share the next).
                Latency per wait, rows a second, and CPU per row (this process, writer thread included).
  end to end    `cedargate run` of this checkout (records before forwarding) against the same checkout
                whose calls do not wait for their record (`no_wait`: `Recorder.commit` only enqueues the
                row, as `record` does, so it is written after the call went; a wrapper started in
                place of the console script patches it in), each on its own SQLite state dir,
                `GET /v1/instances` allowed by the bundled policies, at c=1 and c=16, rounds interleaved
                so drift hits both alike: the difference is what waiting for the commit costs. Latency,
                throughput and the proxy's CPU per request (user+system of the whole process, from /proc).
                `--baseline PATH` compares with another cedargate console script instead.

The load client and the upstream are bench/proxy_overhead.py's (imported, not changed).
Figures go to bench/results/record_latency.json.

    .venv/bin/python bench/record_latency.py [--requests 2000] [--rounds 3] [--baseline PATH] [--postgres URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from figures import write_figures
from proxy_overhead import (
    REPO,
    Processes,
    Upstreams,
    cpu_seconds,
    git_commit,
    run_python,
    start_cedargate,
    start_upstream,
    versions,
)

# proxy_overhead has put the repository on sys.path (for tests.support), so these import.
from addons.enforcer import all_done  # noqa: E402
from proxy.record.store import RECORD_TIMEOUT, Recorder, make_engine  # noqa: E402
from tests.support import launch  # noqa: E402

RESULTS = REPO / "bench" / "results" / "record_latency.json"
# `cedargate` whose calls go without waiting for their record: what the record-before-forward wait adds is
# the difference. The rows are still written, by the writer, as `record` writes a refusal's.
NO_WAIT = f"""#!{sys.executable}
import sys
from concurrent.futures import Future

from proxy.record.store import Recorder


def commit(self, row, *, fail_fast=True):
    self.record(row)
    done = Future()
    done.set_result(None)
    return done


Recorder.commit = commit
from proxy.cli.main import main  # noqa: E402

sys.exit(main())
"""


def _row() -> dict:
    return {
        "decision_id": str(uuid.uuid4()), "at": datetime.now(UTC), "agent": "ops-bot", "method": "GET",
        "scheme": "http", "host": "localhost", "port": 9000, "path": "/v1/instances", "action": 'Action::"get"',
        "resource": 'Host::"localhost"', "decision": "allow", "determining_policies": '["ops-read"]',
        "errors": "[]", "policy_revision": "r" * 64, "upstream_status": None, "duration_ms": 0.4,
    }


async def _waits(recorder: Recorder, concurrency: int, count: int) -> tuple[list[int], float]:
    latencies: list[int] = []
    remaining = count

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            row = _row()
            started = time.perf_counter_ns()
            committed = recorder.commit(row)
            if not committed.done():  # as the enforcer waits (`_on_record`)
                await all_done([committed], RECORD_TIMEOUT)
            committed.result(0)
            latencies.append(time.perf_counter_ns() - started)
            # As the enforcer does once the call is answered.
            recorder.record_outcome(row["decision_id"], row["agent"],
                                    {"upstream_status": 200, "duration_ms": 1.0, "errors": "[]"})

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def commit_wait(url: str, concurrency: int, count: int) -> dict:
    """The commit wait alone, on the database at `url`."""
    recorder = Recorder(make_engine(url))
    try:
        asyncio.run(_waits(recorder, concurrency, 200))  # warm-up
        cpu = time.process_time()
        latencies, seconds = asyncio.run(_waits(recorder, concurrency, count))
        cpu = time.process_time() - cpu
    finally:
        recorder.close()
        recorder.engine.dispose()
    latencies.sort()
    n = len(latencies)
    return {"concurrency": concurrency, "rows": n, "p50_us": round(latencies[n // 2] / 1000, 1),
            "p99_us": round(latencies[int(n * 0.99)] / 1000, 1), "rows_per_s": round(n / seconds),
            "cpu_us_per_row": round(cpu / n * 1e6, 1)}


def end_to_end(procs: Processes, tmp: Path, name: str, binary: Path, upstream: Upstreams, concurrency: int,
               count: int, warmup: int) -> dict:
    launch.CEDARGATE = binary  # the launcher starts this build's console script
    target, _state, gate = start_cedargate(procs, tmp, f"{name}-c{concurrency}-{uuid.uuid4().hex[:6]}",
                                           upstream.ca, 1)
    try:
        run_python(target.port, upstream.http_port, True, concurrency, warmup)
        cpu = cpu_seconds(gate.process.pid)
        result = run_python(target.port, upstream.http_port, True, concurrency, count)
        result.proxy_cpu_us_per_req = (cpu_seconds(gate.process.pid) - cpu) / result.requests * 1e6
    finally:
        procs.stop(gate.process)
    return asdict(result)


def median_of(rounds: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rounds), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per cell and round")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", metavar="URL",
                        help="also time the commit wait on this PostgreSQL database (a throw-away schema: "
                        "it gets cedargate's tables), e.g. postgresql+psycopg://postgres@127.0.0.1/test"
                        "?options=-csearch_path%%3Dbench")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--baseline", type=Path,
                        help="compare with this cedargate console script rather than this build without the wait")
    args = parser.parse_args()
    this = launch.CEDARGATE
    builds = {"record_before_forward": this}
    if args.baseline is not None and not args.baseline.exists():
        parser.error(f"no cedargate at {args.baseline}")

    figures: dict = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "commit": git_commit(),
                     "versions": versions(), "cpus": os.cpu_count(),
                     "command": "python bench/record_latency.py " + " ".join(sys.argv[1:]),
                     "load_average": os.getloadavg()}
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="cedargate-record-latency-") as tmp_name:
        tmp = Path(tmp_name)
        if args.baseline is None:
            no_wait = tmp / "cedargate-no-wait"
            no_wait.write_text(NO_WAIT)
            no_wait.chmod(0o755)
            builds["record_after_answer"] = no_wait
        else:
            builds["record_after_answer"] = args.baseline
        figures["builds"] = {name: str(path) for name, path in builds.items()}
        try:
            figures["commit_wait_sqlite"] = {
                f"c{c}": commit_wait(f"sqlite:///{tmp / f'commit-wait-c{c}.db'}", c, args.requests * 2)
                for c in (1, 16)}
            print("commit wait, SQLite:", figures["commit_wait_sqlite"], flush=True)
            if args.postgres:
                figures["commit_wait_postgres"] = {
                    f"c{c}": commit_wait(args.postgres, c, args.requests * 2) for c in (1, 16)}
                print("commit wait, PostgreSQL:", figures["commit_wait_postgres"], flush=True)
            upstream = start_upstream(procs, tmp)
            rounds: dict[str, list[dict]] = {}
            for round_ in range(args.rounds):
                for concurrency in (1, 16):
                    for name, binary in builds.items():
                        cell = f"{name}/c{concurrency}"
                        result = end_to_end(procs, tmp, name, binary, upstream, concurrency, args.requests,
                                            args.warmup)
                        rounds.setdefault(cell, []).append(result)
                        print(f"round {round_ + 1} {cell}: {result['rps']:.0f} req/s, p50 "
                              f"{result['p50_ms']:.3f} ms, {result['proxy_cpu_us_per_req']:.0f} us CPU/req",
                              flush=True)
        finally:
            procs.stop_all()
    cells = {cell: {key: median_of(results, key) for key in
                    ("rps", "p50_ms", "p99_ms", "mean_ms", "proxy_cpu_us_per_req", "errors")}
             for cell, results in rounds.items()}
    figures["end_to_end_medians"] = cells
    figures["rounds"] = rounds
    if "record_after_answer/c1" in cells:
        before, after = cells["record_before_forward/c1"], cells["record_after_answer/c1"]
        busy_before, busy_after = cells["record_before_forward/c16"], cells["record_after_answer/c16"]
        figures["added"] = {
            "p50_ms_at_c1": round(before["p50_ms"] - after["p50_ms"], 3),
            "throughput_ratio_at_c16": round(busy_before["rps"] / busy_after["rps"], 3),
            "cpu_per_request_ratio_at_c16": round(busy_before["proxy_cpu_us_per_req"]
                                                  / busy_after["proxy_cpu_us_per_req"], 3),
        }
    figures["goal"] = "record-before-forward adds under 0.5 ms p50 at c=1 on SQLite (group commit)"
    write_figures(args.out, figures)
    print(figures.get("added"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
