#!/usr/bin/env python3
"""How many calls one cedargate can hold for review, what holding them costs, and how fast a grant releases.

One run, against loopback servers only:
  1. throughput of allowed GETs (concurrency 16) with no call held;
  2. open N held calls (default 10,000): each a distinct escalatable POST .../i-<n>/stop, each on its
     own connection with `Prefer: wait=600`, so each creates and waits on its own override request;
  3. cedargate's resident memory before and with N held, and throughput again with N held;
  4. approve K of the held requests one at a time through the API and time each from the moment the
     approval is sent to the moment the held call reaches its upstream (both clocks in this process).
Targets: N=10,000 held in under 1 GiB; throughput with N held >= 0.9x of none held; approval-to-upstream
p99 < 50 ms. A miss is reported, never a failing exit. Figures go to bench/results/held_calls.json.

    .venv/bin/python bench/held_calls.py [--held 10000] [--approvals 200] [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_overhead as po  # noqa: E402  (the upstream, the load client and process handling)
from figures import report  # noqa: E402

REPO = po.REPO
RESULTS = REPO / "bench" / "results" / "held_calls.json"
APPROVER, APPROVER_TOKEN = "erin", "bench-approver-" + "y" * 32


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_cedargate(procs: po.Processes, tmp: Path, name: str = "",
                    database_url: str | None = None) -> tuple[subprocess.Popen, int, int, Path]:
    """cedargate started by the e2e tests' launcher (tests/support/launch.py); `name` tells several apart,
    `database_url` is the record's (default: the SQLite file in its state directory)."""
    policy_dir = tmp / "policies"
    if not policy_dir.exists():
        shutil.copytree(REPO / "policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
    state_dir = tmp / f"state{name}"
    config = tmp / f"cedargate{name}.yaml"
    config.write_text(json.dumps({
        "policy_dir": str(policy_dir), "state_dir": str(state_dir), "hold_max_wait": 600,
        "proxy": {"port": 0}, "api": {"port": 0},
        # One agent holds them all: the limits that stop one agent flooding reviewers are lifted.
        "max_pending_overrides_per_agent": 1_000_000, "override_rate": 1_000_000,
        "agents": {po.AGENT: {"token_sha256": hashlib.sha256(po.TOKEN.encode()).hexdigest()}},
        "approvers": {APPROVER: {"token_sha256": hashlib.sha256(APPROVER_TOKEN.encode()).hexdigest(),
                                 "roles": ["engineering-manager"]}},
        **({"database_url": database_url} if database_url else {}),
    }))
    gate = po.launch_cedargate(config, "--log-level", "WARNING", timeout=60)
    procs.children.append(("cedargate", gate.process))
    return gate.process, gate.proxy_port, gate.api_port, state_dir


class ArrivalServer(asyncio.Protocol):
    """The held calls' upstream: notes when each path arrives, answers 200."""

    arrivals: dict[str, int] = {}

    def connection_made(self, transport) -> None:
        self.transport, self.buf = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            ArrivalServer.arrivals[path] = time.perf_counter_ns()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def open_held(proxy_port: int, upstream_port: int, count: int) -> list[asyncio.StreamWriter]:
    auth = "Basic " + base64.b64encode(f"{po.AGENT}:{po.TOKEN}".encode()).decode()
    writers = []
    for n in range(count):
        _reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        writer.write(
            f"POST http://127.0.0.1:{upstream_port}/v1/instances/i-{n}/stop HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{upstream_port}\r\nProxy-Authorization: {auth}\r\nPrefer: wait=600\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        writers.append(writer)
        if n % 500 == 499:
            await writer.drain()
    return writers


def pending_count(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "cedargate.db") as db:
        return db.execute("SELECT count(*) FROM overrides WHERE status = 'pending'").fetchone()[0]


def approve(api_port: int, override_id: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{api_port}/overrides/{override_id}/approve", method="POST",
        data=b'{"reason": "bench"}', headers={"Authorization": f"Bearer {APPROVER_TOKEN}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status


async def run(args) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.held + 1000:
        raise SystemExit(f"open-file limit {hard} is too low for {args.held} held calls")
    procs = po.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="cedargate-held-"))
    writers: list[asyncio.StreamWriter] = []
    try:
        load_upstream = po.start_upstream(procs, tmp).http_port
        proc, proxy_port, api_port, state_dir = start_cedargate(procs, tmp)
        loop = asyncio.get_running_loop()
        arrival_server = await loop.create_server(ArrivalServer, "127.0.0.1", 0, backlog=4096)
        held_upstream = arrival_server.sockets[0].getsockname()[1]
        payload = po.request_bytes(load_upstream, True)

        await po._python_load(proxy_port, payload, 16, 500)  # warm-up
        baseline = await po._python_load(proxy_port, payload, 16, args.requests)
        rss_before = rss_mib(proc.pid)

        started = time.monotonic()
        writers = await open_held(proxy_port, held_upstream, args.held)
        deadline = time.monotonic() + 600
        while (held := await asyncio.to_thread(pending_count, state_dir)) < args.held:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"only {held} of {args.held} calls were held")
            await asyncio.sleep(0.5)
        hold_seconds = time.monotonic() - started
        rss_held = rss_mib(proc.pid)
        loaded = await po._python_load(proxy_port, payload, 16, args.requests)

        with sqlite3.connect(state_dir / "cedargate.db") as db:
            rows = db.execute("SELECT id, path FROM overrides WHERE status = 'pending' LIMIT ?",
                              (args.approvals,)).fetchall()
        latencies = []
        for override_id, path in rows:
            ArrivalServer.arrivals.pop(path, None)
            t0 = time.perf_counter_ns()
            await asyncio.to_thread(approve, api_port, override_id)
            while path not in ArrivalServer.arrivals:
                await asyncio.sleep(0.0005)
            latencies.append((ArrivalServer.arrivals[path] - t0) / 1e6)
        latencies.sort()
        return {
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "held": args.held,
            "seconds_to_hold_all": round(hold_seconds, 1),
            "rss_mib_none_held": round(rss_before, 1),
            "rss_mib_with_held": round(rss_held, 1),
            "throughput_rps_none_held": round(baseline.rps, 1),
            "throughput_rps_with_held": round(loaded.rps, 1),
            "throughput_ratio": round(loaded.rps / baseline.rps, 3),
            "p50_ms_none_held": round(baseline.p50_ms, 3),
            "p50_ms_with_held": round(loaded.p50_ms, 3),
            "approvals_timed": len(latencies),
            "approval_to_upstream_ms": {"p50": round(statistics.median(latencies), 2),
                                        "p99": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
                                        "max": round(latencies[-1], 2)},
            "targets": {
                "held_under_1GiB": rss_held < 1024,
                "throughput_ratio_at_least_0.9": loaded.rps / baseline.rps >= 0.9,
                "approval_p99_under_50ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] < 50,
            },
            "note": "load: asyncio raw-socket client, 16 keep-alive connections, GET allowed by ops-read; "
                    "approval timed from sending POST /overrides/{id}/approve to the upstream receiving the call",
        }
    finally:
        for writer in writers:
            writer.close()
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held", type=int, default=10_000)
    parser.add_argument("--approvals", type=int, default=200)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    return report(args.out, asyncio.run(run(args)))


if __name__ == "__main__":
    sys.exit(main())
