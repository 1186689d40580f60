"""The launcher of a real cedargate: `cedargate run --config ...`, the console script of the venv running
this Python, started as users start it, on the ports its config gives (0 for any free one); the printed
listening lines give the ports. Used by the end-to-end tests and by the benchmarks in bench/.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CEDARGATE = Path(sys.executable).parent / "cedargate"
# The agent whose credentials `Cedargate.proxy_url` carries (the config must know it).
AGENT, TOKEN = "ops-bot", "e2e-token-3f9c1a"


@dataclass
class Cedargate:
    process: subprocess.Popen
    proxy_port: int
    api_port: int
    state_dir: Path
    policy_dir: Path
    output: list[str]
    argv: list[str] = field(default_factory=list)

    @property
    def proxy_url(self) -> str:
        return f"http://{AGENT}:{TOKEN}@127.0.0.1:{self.proxy_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "mitmproxy-ca-cert.pem"

    @property
    def database(self) -> Path:
        return self.state_dir / "cedargate.db"

    def children(self) -> list[int]:
        """The pids of the processes this cedargate started: its proxy workers under `--workers N`."""
        pid = self.process.pid
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def audit_verify(self, database_url: str | None = None) -> subprocess.CompletedProcess[str]:
        """`cedargate audit verify` on this cedargate's store (its SQLite file unless `database_url`)."""
        store = ["--database-url", database_url] if database_url else ["--state-dir", str(self.state_dir)]
        return subprocess.run([str(CEDARGATE), "audit", "verify", *store], capture_output=True, text=True,
                              timeout=60)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def start_cedargate(
    config: Path, *extra_args: str, timeout: float = 30.0, preexec_fn: Callable[[], object] | None = None,
    clock_file: Path | None = None, heap_probe: Path | None = None,
) -> Cedargate:
    """Start `cedargate run --config config *extra_args` and wait until both its proxy and its API listen.

    Its output (stdout and stderr) is kept in `Cedargate.output`. `preexec_fn` runs in the child before
    cedargate starts (e.g. to lower its open-file limit). With `clock_file`, the same program decides
    calls at the time that file says, read at each decision (tests/support/fixed_clock.py). With
    `heap_probe`, it answers SIGUSR1 by writing what its held calls left in memory to that file
    (tests/support/heap_probe.py).
    """
    loaded = yaml.safe_load(config.read_text())
    program = [str(CEDARGATE)]
    if clock_file is not None:
        program = [sys.executable, "-m", "tests.support.fixed_clock", str(clock_file)]
    elif heap_probe is not None:
        program = [sys.executable, "-m", "tests.support.heap_probe", str(heap_probe)]
    argv = [*program, "run", "--config", str(config), *extra_args]
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=preexec_fn,
    )
    output: list[str] = []
    ports: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(ports) < 2:
        line = process.stdout.readline()
        if not line:
            process.wait(5)
            raise RuntimeError("cedargate exited before listening:\n" + "".join(output))
        output.append(line)
        listening = re.match(r"cedargate (proxy|API) listening on http://[^\s]+:(\d+)$", line.strip())
        if listening:
            ports[listening.group(1)] = int(listening.group(2))
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("cedargate did not start in time:\n" + "".join(output))
    # Keep draining output so the child never blocks on a full pipe.
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
    return Cedargate(process, ports["proxy"], ports["API"], Path(loaded["state_dir"]), Path(loaded["policy_dir"]),
                     output, argv)
