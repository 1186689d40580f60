"""One proxy worker of `cedargate run --workers N`: `python -m proxy.cli.worker --fd FD --shares FDS --slot I`,
started by `proxy.cli.workers`, never by hand.

It reads its settings (JSON, one line) from stdin, builds its own core (`Runtime`) on the shared store,
and proxies on the listening socket it inherited as descriptor FD, with the same mitmproxy master as a
single `cedargate run` (`proxy.cli.master`), taking turns with the other workers to accept, through
entry I of the table of open connections it inherited (`proxy.cli.balance`). It runs no override API and
none of the core's sweeps (expiry): those run once, in the supervisor; it runs the wake-ups of the calls
it holds (`Jobs.start(sweeps=False)`), so a decision made through the supervisor's API releases them at
once. Once it serves it prints `ready` on stdout. SIGTERM or SIGINT stops it as they stop `cedargate
run`; so does the end of its stdin, which is its supervisor's death.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from proxy.calls.connections import open_file_limit
from proxy.cli.balance import ConnectionShares, Share
from proxy.cli.fronts import mitmproxy_options
from proxy.cli.listeners import limit_connections
from proxy.cli.master import proxy_addrs, proxy_master, stop_gracefully
from proxy.oversight import urgency
from proxy.oversight.heap import HeldHeap
from proxy.runtime import Runtime
from proxy.settings.config import Settings

log = logging.getLogger("proxy.cli.worker")  # not __name__: run as __main__

READY = "ready"
LOG_FORMAT = "%(asctime)s %(levelname)s [worker %(process)d] %(name)s: %(message)s"


async def work(settings: Settings, sock: socket.socket, shares: ConnectionShares, slot: int) -> None:
    open_files = open_file_limit(raise_to_hard=True)  # first: the runtime's ceilings derive from it
    runtime = Runtime.start(settings)
    try:
        # The supervisor's API, at the real address it bound: held calls' answers link to it.
        runtime.api_started(settings.api.host, settings.api.port)
        runtime.jobs.start(sweeps=False)
        master = proxy_master(runtime, open_files, sock, mitmproxy_options(settings))
        loop = asyncio.get_running_loop()
        share = Share(shares, slot, loop)
        # Before the master serves on it: the share joins the table here, so this worker never accepts
        # unseen by the others.
        limit_connections(sock, runtime.capacity, share=share)
        runtime.holds.heap = HeldHeap()  # long holds out of the collector's full passes (proxy.oversight.heap)
        runtime.holds.heap.started()

        def stop() -> None:
            log.info("stopping")
            share.leave()  # the other workers, if still serving, no longer wait for this one to take its turn
            stop_gracefully(master)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)

        def supervisor_gone() -> None:
            if not os.read(sys.stdin.fileno(), 4096):  # end of file: the supervisor died
                loop.remove_reader(sys.stdin.fileno())
                log.error("the supervisor is gone: stopping")
                stop()

        loop.add_reader(sys.stdin.fileno(), supervisor_gone)

        async def announce() -> None:
            while not proxy_addrs(master):
                await asyncio.sleep(0.01)
            print(READY, flush=True)

        await asyncio.gather(master.run(), announce())
    finally:
        runtime.close()


def main(argv: list[str] | None = None) -> int:
    # A process group apart from the terminal's foreground one (`proxy.cli.workers`): with the terminal's
    # `stty tostop`, writing a log line would stop this process; it writes all the same.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="python -m proxy.cli.worker", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    parser.add_argument("--shares", required=True, help="the inherited table of open connections: its descriptors")
    parser.add_argument("--slot", type=int, required=True, help="this worker's entry in the table")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    logging.getLogger("mitmproxy").setLevel(max(logging.WARNING, logging.getLogger().level))
    settings = Settings.model_validate_json(sys.stdin.readline())
    sock = socket.socket(fileno=args.fd)
    urgency.run(work(settings, sock, ConnectionShares.inherit(args.shares), args.slot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
