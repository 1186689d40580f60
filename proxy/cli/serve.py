"""`cedargate run`: the mitmproxy proxy and the override API around one core.

With one worker (the default) the proxy and the API run in one process and one event loop, so the API
reports on exactly the core that decides the calls. With `--workers N` this process binds the proxy's
port and runs the API and the core's jobs (expiry), and N proxy processes (`proxy.cli.workers`) serve
that port, each with its own core on the shared store. Either way the proxy is the lean mitmproxy master
of `proxy.cli.master`; what `cedargate run` shares with `mitmdump -s addons/enforcer.py`
(`proxy.cli.standalone`) is in `proxy.cli.fronts`. Every process records its metrics into a new
directory of this run's own under `metrics/` in the state dir, so the API's `GET /metrics` sums them
(`proxy.observe.metrics`), and another `cedargate run` on the same state dir keeps its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from proxy.calls.connections import open_file_limit
from proxy.cli.fronts import api_server, bind_api, check_loopback, ensure_ca, mitmproxy_options
from proxy.cli.listeners import guard_accepts, limit_connections
from proxy.cli.master import listening_socket, proxy_addrs, proxy_master, stop_gracefully
from proxy.cli.workers import WorkerFailed, Workers
from proxy.observe import metrics
from proxy.oversight.heap import HeldHeap
from proxy.runtime import Runtime, private_state_dir
from proxy.settings.config import ConfigError, Listen, Settings

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)

METRICS_DIR = "metrics"  # under the state dir: each run's processes' metric values, summed by GET /metrics


async def serve(settings: Settings, ready: asyncio.Event | None = None, log_level: str = "INFO") -> None:
    try:
        for name, listen in (("proxy", settings.proxy), ("API", settings.api)):
            check_loopback(name, listen.host, settings.allow_non_loopback, "pass --allow-non-loopback")
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None

    open_files = open_file_limit(raise_to_hard=True)  # first: the runtime's ceilings derive from it
    try:
        private_state_dir(settings.state_dir)
        # Before the core records anything, and before the workers start (they inherit the directory).
        metrics.share_between_processes(metrics.claim_directory(settings.state_dir / METRICS_DIR))
    except OSError as exc:
        raise SystemExit(f"cedargate: cannot prepare the metrics directory under {settings.state_dir}: {exc}") from None
    runtime = Runtime.start(settings)
    with contextlib.ExitStack() as sockets:
        try:
            ensure_ca(settings.state_dir)
            proxy_socket = sockets.enter_context(listening_socket(settings))
            api_socket = sockets.enter_context(bind_api(settings))
        except ConfigError:
            runtime.close()
            raise
        api = api_server(runtime, open_files)
        # Port 0 asks the OS for a free port; the real ones are printed so tests and users can find them.
        proxy_port, api_port = proxy_socket.getsockname()[1], api_socket.getsockname()[1]
        runtime.api_started(settings.api.host, api_port)

        async def announce(proxy_ready: Callable[[], bool]) -> None:
            while not (api.started and proxy_ready()):
                await asyncio.sleep(0.02)
            print(f"cedargate proxy listening on http://{settings.proxy.host}:{proxy_port}", flush=True)
            print(f"cedargate API listening on http://{settings.api.host}:{api_port}", flush=True)
            revision = runtime.engine.status.revision
            assert revision is not None  # the runtime started with its policies loaded
            print(f"policy revision {revision[:12]} from {settings.policy_dir}", flush=True)
            if ready:
                ready.set()

        runtime.jobs.start()  # expiry: the core's, on this loop, in this process only
        guard_accepts()  # before any listener serves: accept errors back off and are logged once a minute
        try:
            if settings.workers == 1:
                await _one_process(settings, runtime, proxy_socket, api, api_socket, announce)
            else:
                at = settings.model_copy(update={"proxy": Listen(host=settings.proxy.host, port=proxy_port),
                                                 "api": Listen(host=settings.api.host, port=api_port)})
                await _supervise(at, runtime, proxy_socket, api, api_socket, announce, log_level)
        finally:
            runtime.jobs.stop()
            runtime.close()


Announce = Callable[[Callable[[], bool]], Coroutine[Any, Any, None]]


async def _one_process(settings: Settings, runtime: Runtime, proxy_socket: socket.socket, api: uvicorn.Server,
                       api_socket: socket.socket, announce: Announce) -> None:
    master = proxy_master(runtime, open_file_limit(), proxy_socket, mitmproxy_options(settings))
    limit_connections(proxy_socket, runtime.capacity)  # the API's listener: backing off only (guard_accepts)
    runtime.holds.heap = HeldHeap()  # long holds out of the collector's full passes (proxy.oversight.heap)
    runtime.holds.heap.started()

    async def stop_in_order() -> None:
        await stop_gracefully(master)
        api.should_exit = True  # after the proxy's calls: a held one may yet be decided through it

    stopping: list[asyncio.Task[None]] = []

    def stop() -> None:
        if not stopping:
            stopping.append(asyncio.create_task(stop_in_order()))

    _on_stop_signals(stop)
    await asyncio.gather(master.run(), api.serve(sockets=[api_socket]),
                         announce(lambda: bool(proxy_addrs(master))))


async def _supervise(settings: Settings, runtime: Runtime, proxy_socket: socket.socket,
                     api: uvicorn.Server, api_socket: socket.socket, announce: Announce, log_level: str) -> None:
    workers = Workers(settings, proxy_socket, log_level)
    runtime.proxy_workers = lambda: workers.started  # /status reports theirs: this process proxies nothing
    stopped = asyncio.Event()

    def stop() -> None:
        workers.stopping = True  # at once: a worker exiting from now on is not restarted
        stopped.set()

    _on_stop_signals(stop)
    try:
        await workers.start()
    except WorkerFailed as exc:
        raise SystemExit(f"cedargate: {exc}") from None
    api_task = asyncio.create_task(api.serve(sockets=[api_socket]), name="cedargate override API")
    announced = asyncio.create_task(announce(lambda: True))
    await asyncio.wait({announced, api_task}, return_when=asyncio.FIRST_COMPLETED)
    if not announced.done():  # the API ended before it served (uvicorn ends a failed start with sys.exit)
        announced.cancel()
        await workers.stop()
        failure = api_task.exception() if not api_task.cancelled() else None
        raise SystemExit(f"cedargate: the override API did not start: {failure!r}")
    print(f"cedargate proxy workers: {settings.workers} (pids {' '.join(map(str, workers.pids))})", flush=True)
    watching = asyncio.create_task(workers.watch(), name="cedargate proxy workers")
    stopping = asyncio.create_task(stopped.wait())
    await asyncio.wait({watching, stopping}, return_when=asyncio.FIRST_COMPLETED)
    failure = watching.exception() if watching.done() else None
    watching.cancel()
    stopping.cancel()
    # Once every worker has closed its copy too, new connections are refused rather than queued unseen.
    proxy_socket.close()
    # The workers drain first, the API serving meanwhile (a held call may yet be decided); then the API.
    codes = await workers.stop()
    api.should_exit = True
    await api_task
    if failure is not None:
        raise SystemExit(f"cedargate: {failure}")
    if any(codes):
        raise SystemExit(f"cedargate: proxy workers exited with codes {codes}")


def _on_stop_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
