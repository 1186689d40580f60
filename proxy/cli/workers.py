"""The proxy workers of `cedargate run --workers N`: started, watched, restarted and stopped here.

The supervisor (the `cedargate run` process, which also runs the override API and the core's jobs)
binds the proxy's port (`proxy.cli.master.listening_socket`) and hands the socket to every worker
(`proxy.cli.worker`), with the table in which the workers count their open connections to take turns
accepting (`proxy.cli.balance`); worker i keeps entry i, and so does the worker that replaces it, which
starts from zero: the supervisor clears a dead worker's entry, so the others take what comes meanwhile.

A worker that dies after it served is restarted, as gunicorn's arbiter does: the other workers and the
API are not taken down with it (what the dead one had in flight is lost as with any killed cedargate
process: its agents see their connections cut). One that dies before it served (bad settings, an unreachable
store) would only die again, so the supervisor stops everything and says why; and a worker dying again
and again (more than `MAX_RESTARTS` in `RESTART_WINDOW` seconds) stops everything too, so a crash loop
ends in an exit a service manager sees rather than in a proxy that mostly refuses.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections import deque

from proxy.cli.balance import ConnectionShares
from proxy.cli.worker import READY
from proxy.observe.metrics import process_gone
from proxy.settings.config import Settings

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
BOOT_TIMEOUT = 60.0
# Beyond the longest hold, how long a stopping worker may take to finish its calls before it is killed.
STOP_GRACE = 10.0


class WorkerFailed(Exception):
    """The workers cannot run; the message says which one and why."""


class Workers:
    def __init__(self, settings: Settings, sock: socket.socket, log_level: str) -> None:
        self.settings = settings
        self.sock = sock  # every worker serves on it
        self.shares = ConnectionShares.create(settings.workers)  # worker i keeps entry i
        self.log_level = log_level
        self.processes: list[asyncio.subprocess.Process] = []
        self.started: list[int] = []  # every worker's pid, live or gone: whose figures /status sums
        self.stopping = False
        self._deaths: deque[float] = deque()
        self._relays: set[asyncio.Task[None]] = set()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    async def start(self) -> None:
        """Start every worker and wait until each serves, or raise `WorkerFailed` (none left running)."""
        spawned = await asyncio.gather(*(self._spawn(slot) for slot in range(self.settings.workers)),
                                       return_exceptions=True)
        self.processes = [process for process in spawned if isinstance(process, asyncio.subprocess.Process)]
        failures = [failure for failure in spawned if isinstance(failure, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        fd = self.sock.fileno()
        process = await asyncio.create_subprocess_exec(
            # -P: the worker imports cedargate as this process did, not from a `proxy` package that happens
            # to be in the current directory (which `-m` would put first on its path).
            sys.executable, "-P", "-m", "proxy.cli.worker", "--fd", str(fd), "--shares", self.shares.descriptors,
            "--slot", str(slot), "--log-level", self.log_level,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=(fd, *self.shares.fds),
            # Its own process group: a Ctrl-C in the terminal (sent to the foreground group) reaches this
            # process alone, which stops the workers in order (see `stop`), rather than every worker at
            # once behind its back. Not its own session: Linux schedules each session as one group
            # (autogroup) with one share of the CPUs, so a worker in a session of its own competed with
            # its supervisor, and every other program, as a program apart, and waited longer for a CPU
            # at each wake-up: measured on a loaded machine, 1.1-1.2x the calls at c=16 and up to 3x at
            # c=1 in the supervisor's session.
            process_group=0,
        )
        assert process.stdin is not None and process.stdout is not None
        self.started.append(process.pid)
        # Its settings, then nothing: the pipe stays open as long as this process lives (see the worker).
        process.stdin.write(self.settings.model_dump_json().encode() + b"\n")
        await process.stdin.drain()
        try:
            line = await asyncio.wait_for(process.stdout.readline(), BOOT_TIMEOUT)
        except TimeoutError:
            line = b""
        if line.decode().strip() != READY:
            if process.returncode is None:
                process.kill()
            code = await process.wait()
            raise WorkerFailed(f"proxy worker {process.pid} did not start ({_exit(code)}); see its log above")
        relay = asyncio.create_task(_relay(process.stdout), name=f"output of worker {process.pid}")
        self._relays.add(relay)
        relay.add_done_callback(self._relays.discard)
        log.info("proxy worker %d serving", process.pid)
        return process

    async def watch(self) -> None:
        """Restart a worker that dies; return when stopping, raise `WorkerFailed` when giving up."""
        while not self.stopping:
            waits = {asyncio.ensure_future(process.wait()): process for process in self.processes}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for future in pending:
                future.cancel()
            if self.stopping:
                return
            for future in done:
                dead = waits[future]
                now = time.monotonic()
                self._deaths.append(now)
                while self._deaths and self._deaths[0] < now - RESTART_WINDOW:
                    self._deaths.popleft()
                if len(self._deaths) > MAX_RESTARTS:
                    raise WorkerFailed(
                        f"proxy worker {dead.pid} exited ({_exit(future.result())}), the "
                        f"{len(self._deaths)}th to die in {RESTART_WINDOW:.0f} s: not restarting again"
                    )
                log.error("proxy worker %d exited (%s): starting another", dead.pid, _exit(future.result()))
                process_gone(dead.pid)
                slot = self.processes.index(dead)
                self.shares.vacate(slot)  # the live workers take what comes until its replacement serves
                self.processes[slot] = await self._spawn(slot)

    async def stop(self) -> list[int]:
        """Stop every worker as SIGTERM stops `cedargate run` (they finish their calls); their exit codes."""
        self.stopping = True
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        grace = self.settings.hold_max_wait + STOP_GRACE
        codes = []
        for process in self.processes:
            try:
                codes.append(await asyncio.wait_for(process.wait(), grace))
            except TimeoutError:
                log.error("proxy worker %d still running %.0f s after SIGTERM: killing it", process.pid, grace)
                process.kill()
                codes.append(await process.wait())
            process_gone(process.pid)
        if self._relays:
            await asyncio.gather(*self._relays, return_exceptions=True)
        self.shares.close()
        return codes


async def _relay(output: asyncio.StreamReader) -> None:
    """A worker's stdout, passed on to ours (and read, so the worker never blocks on a full pipe)."""
    while line := await output.readline():
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()


def _exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
