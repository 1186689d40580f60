#!/usr/bin/env python3
"""Two cedargate instances on one database: how fast an approval through one releases a call held on the other.

One run, on loopback, for each store (a PostgreSQL schema on 127.0.0.1:5432, and one SQLite file):
  1. start instances A and B (`cedargate run`, one after the other) on the same database;
  2. hold N distinct escalated calls on A (`Prefer: wait=600`, each its own override request);
  3. approve them one at a time, alternately through B's API (across instances: the wake-up travels by
     PostgreSQL NOTIFY, or SQLite's data_version watcher) and through A's own (the same-process
     baseline), timing each from sending the approval to the held call reaching its upstream;
  4. the CPU time A and B spent meanwhile (their /proc stat), per approval.
Goal: across instances, p99 under 250 ms. A miss is reported, never a failing exit.
Figures go to bench/results/cross_instance.json.

    .venv/bin/python bench/cross_instance.py [--approvals 200] [--stores postgres,sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_overhead as po  # noqa: E402  (process handling)
from figures import report  # noqa: E402
from held_calls import ArrivalServer, approve, open_held, start_cedargate  # noqa: E402

REPO = po.REPO
RESULTS = REPO / "bench" / "results" / "cross_instance.json"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GOAL_P99_MS = 250.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50": round(statistics.median(ordered), 2),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
            "max": round(ordered[-1], 2)}


async def measure(store: str, url: str, tmp: Path, approvals: int) -> dict:
    procs = po.Processes()
    writers: list[asyncio.StreamWriter] = []
    database = sqlalchemy.create_engine(url)
    try:
        proc_a, proxy_a, api_a, _ = start_cedargate(procs, tmp, "-a", url)
        proc_b, _, api_b, _ = start_cedargate(procs, tmp, "-b", url)
        ArrivalServer.arrivals.clear()
        server = await asyncio.get_running_loop().create_server(ArrivalServer, "127.0.0.1", 0, backlog=4096)
        upstream_port = server.sockets[0].getsockname()[1]
        writers = await open_held(proxy_a, upstream_port, approvals)
        deadline = time.monotonic() + 120
        while True:
            with database.connect() as db:
                rows = db.execute(sqlalchemy.text(
                    "SELECT id, path FROM overrides WHERE status = 'pending' ORDER BY path")).fetchall()
            if len(rows) >= approvals:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(rows)} of {approvals} calls were held on A")
            await asyncio.sleep(0.2)
        latencies: dict[str, list[float]] = {"through_b": [], "through_a": []}
        cpu_before = cpu_seconds(proc_a.pid), cpu_seconds(proc_b.pid)
        for n, (override_id, path) in enumerate(rows):
            through, api_port = ("through_b", api_b) if n % 2 == 0 else ("through_a", api_a)
            t0 = time.perf_counter_ns()
            await asyncio.to_thread(approve, api_port, override_id)
            while path not in ArrivalServer.arrivals:
                await asyncio.sleep(0.0005)
            latencies[through].append((ArrivalServer.arrivals[path] - t0) / 1e6)
        cpu_after = cpu_seconds(proc_a.pid), cpu_seconds(proc_b.pid)
        server.close()
        across = percentiles(latencies["through_b"])
        return {
            "approvals_timed": sum(len(v) for v in latencies.values()),
            "approval_to_upstream_ms": {"across_instances": across,
                                        "same_instance": percentiles(latencies["through_a"])},
            "cpu_ms_per_approval": {
                "instance_a_holding": round((cpu_after[0] - cpu_before[0]) * 1000 / len(rows), 2),
                "instance_b_approving": round((cpu_after[1] - cpu_before[1]) * 1000 / len(rows), 2)},
            "goal_p99_under_250ms": across["p99"] < GOAL_P99_MS,
        }
    finally:
        for writer in writers:
            writer.close()
        procs.stop_all()
        database.dispose()


def postgres_schema() -> tuple[str, sqlalchemy.Engine, str]:
    schema = f"cg_bench_{uuid.uuid4().hex[:10]}"
    server = sqlalchemy.create_engine(PG_SERVER)
    with server.begin() as conn:
        conn.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    return f"{PG_SERVER}?options=-csearch_path%3D{schema}", server, schema


async def run(args) -> dict:
    result: dict = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "stores": {}}
    for store in args.stores.split(","):
        tmp = Path(tempfile.mkdtemp(prefix=f"cedargate-cross-{store}-"))
        server = schema = None
        try:
            if store == "postgres":
                url, server, schema = postgres_schema()
            else:
                url = f"sqlite:///{tmp / 'shared.db'}"
            result["stores"][store] = await measure(store, url, tmp, args.approvals)
        finally:
            if server is not None:
                with server.begin() as conn:
                    conn.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
                server.dispose()
            shutil.rmtree(tmp, ignore_errors=True)
    result["note"] = ("two `cedargate run` processes on one database; N calls held on A; approvals alternate "
                      "between B's API (across instances) and A's (same instance), each timed from sending "
                      "POST /overrides/{id}/approve to the upstream receiving the held call")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--approvals", type=int, default=200)
    parser.add_argument("--stores", default="postgres,sqlite")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    return report(args.out, asyncio.run(run(args)))


if __name__ == "__main__":
    sys.exit(main())
