"""`cedargate run --workers N`, and several `cedargate run` on one store: real processes, real clients.

Every test starts real cedargate processes (tests/support/launch.py) on loopback and talks to them as
agents and operators do: calls through the proxy, signals to the processes, `cedargate audit verify`.
Which worker served a connection is read from the kernel (/proc: the worker holding the accepted socket).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from e2e_support import AGENT, APPROVERS, TOKEN, Cedargate, Upstream, start_cedargate, write_config
from sqlalchemy import text

from proxy.record.store import make_engine
from tests.support.candidates import candidate_policies
from tests.support.kernel import connections_by_process
from tests.support.waiting import wait_until

CLIENTS = 12  # agents connected at once, each on its own keep-alive connection
CALLS = 8  # per agent
ALLOWED = "/v1/instances"  # ops-bot may GET it on localhost (policy ops-read)


def agents(gate: Cedargate, count: int = CLIENTS) -> list[httpx.Client]:
    trust = ssl.create_default_context(cafile=str(gate.ca_cert))
    return [httpx.Client(proxy=gate.proxy_url, verify=trust, timeout=30) for _ in range(count)]


def call_from_all(clients: list[httpx.Client], upstream: Upstream, calls: int = 1) -> list[int]:
    """`calls` allowed calls from every client at once (half of them over HTTPS); their statuses."""
    def run(n: int) -> list[int]:
        scheme, port = ("https", upstream.https_port) if n % 2 else ("http", upstream.http_port)
        return [clients[n].get(f"{scheme}://localhost:{port}{ALLOWED}").status_code for _ in range(calls)]

    with ThreadPoolExecutor(len(clients)) as pool:
        return [status for statuses in pool.map(run, range(len(clients))) for status in statuses]


def alive(pid: int) -> bool:
    """Running (a process that exited but nobody reaped yet, a zombie, is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def calls_through(gate: Cedargate, upstream: Upstream, clients: int, calls: int) -> list[int]:
    """`calls` allowed calls from each of `clients` new agents at once; their statuses."""
    opened = agents(gate, clients)
    try:
        return call_from_all(opened, upstream, calls)
    finally:
        for client in opened:
            client.close()


def decisions(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM decisions WHERE decision = 'allow'")).scalar_one())
    finally:
        engine.dispose()


def store_url(gate: Cedargate, database_url: str | None) -> str:
    return database_url or f"sqlite:///{gate.database}"


def start_workers(tmp_path: Path, policy_dir: Path, upstream: Upstream, database_url: str | None,
                  workers: int = 2, **settings) -> Cedargate:
    extra = {"database_url": database_url, **settings} if database_url else settings
    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream, **extra)
    gate = start_cedargate(config, "--workers", str(workers))
    upstream.reset()
    return gate


def test_two_workers_share_the_port_the_ca_and_one_record(tmp_path, policy_dir, upstream, database_url):
    gate = start_workers(tmp_path, policy_dir, upstream, database_url)
    try:
        workers = gate.children()
        assert len(workers) == 2
        wait_until(lambda: any("cedargate proxy workers:" in line for line in gate.output), what="the workers line")
        announced = next(line for line in gate.output if "cedargate proxy workers:" in line)
        assert re.fullmatch(r"cedargate proxy workers: 2 \(pids (\d+) (\d+)\)\n?", announced)
        assert set(map(int, re.findall(r"\d+", announced)[1:])) == set(workers)
        clients = agents(gate)
        try:
            statuses = call_from_all(clients, upstream)
            # Each agent's connection is still open: the kernel says which worker accepted it.
            served = connections_by_process(gate.proxy_port, workers)
            statuses += call_from_all(clients, upstream, CALLS - 1)
        finally:
            for client in clients:
                client.close()
        assert sum(served.values()) == CLIENTS
        assert all(served.values()), f"a worker served no connection: {served}"
        # Nothing refused (a store that one writer held would have made it a 503), and all on the record.
        assert statuses == [200] * CLIENTS * CALLS
        url = store_url(gate, database_url)
        wait_until(lambda: decisions(url) == CLIENTS * CALLS, what="every call on the record")
    finally:
        assert gate.stop() == 0
    assert not any(alive(pid) for pid in workers), "a worker outlived its supervisor"
    verified = gate.audit_verify(database_url)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    # Each call is chained twice: its decision before it went upstream, its outcome once answered.
    assert f"audit log OK: {2 * CLIENTS * CALLS} rows" in verified.stdout


@contextmanager
def slow_upstream(release: threading.Event) -> Iterator[tuple[int, threading.Event]]:
    """A loopback upstream that answers each call once `release` is set; yields its port and an event
    set when a call arrived."""
    arrived = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            arrived.set()
            release.wait(30)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], arrived
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def open_connections(gate: Cedargate, count: int) -> list[http.client.HTTPConnection]:
    """`count` agent connections to the proxy, all opened before any is used (as an agent's pool opening
    together), each then making one allowed call and kept open."""
    connections = [http.client.HTTPConnection("127.0.0.1", gate.proxy_port, timeout=30) for _ in range(count)]
    for connection in connections:
        connection.connect()
    return connections


def call_on(connections: list[http.client.HTTPConnection], upstream: Upstream) -> list[int]:
    statuses = []
    for connection in connections:
        connection.request("GET", f"http://localhost:{upstream.http_port}{ALLOWED}", headers={
            "Proxy-Authorization": "Basic " + base64.b64encode(f"{AGENT}:{TOKEN}".encode()).decode()})
        answer = connection.getresponse()
        answer.read()
        statuses.append(answer.status)
    return statuses


def test_connections_opened_together_are_dealt_out_evenly_and_a_replaced_worker_takes_its_share(
        tmp_path, policy_dir, upstream):
    """16 connections opened at once land 8 on each worker, whatever their addresses; a worker killed
    is replaced, and the new connections go to the replacement until it holds as many as the other."""
    gate = start_workers(tmp_path, policy_dir, upstream, None)
    first: list[http.client.HTTPConnection] = []
    then: list[http.client.HTTPConnection] = []
    try:
        workers = gate.children()
        first = open_connections(gate, 16)
        assert call_on(first, upstream) == [200] * 16
        assert sorted(connections_by_process(gate.proxy_port, workers).values()) == [8, 8]

        killed, kept = workers
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: len(gate.children()) == 2 and killed not in gate.children(), what="a new worker")
        replacement = next(pid for pid in gate.children() if pid != kept)
        wait_until(lambda: any(f"proxy worker {replacement} serving" in line for line in gate.output),
                   what="the new worker to serve")
        then = open_connections(gate, 8)
        assert call_on(then, upstream) == [200] * 8
        # The kept worker still holds its 8; the 8 new ones all went to the replacement, which had none.
        assert connections_by_process(gate.proxy_port, [kept, replacement]) == {kept: 8, replacement: 8}
        assert gate.process.poll() is None
    finally:
        for connection in first + then:
            connection.close()
        assert gate.stop() == 0


def test_sigterm_stops_the_workers_after_their_calls(tmp_path, policy_dir, upstream):
    gate = start_workers(tmp_path, policy_dir, upstream, None)
    workers = gate.children()
    release = threading.Event()
    with slow_upstream(release) as (port, arrived), httpx.Client(proxy=gate.proxy_url, timeout=30) as client:
        answer: list[int] = []
        in_flight = threading.Thread(target=lambda: answer.append(client.get(f"http://localhost:{port}{ALLOWED}").status_code))
        in_flight.start()
        assert arrived.wait(20)
        gate.process.send_signal(signal.SIGTERM)
        # Both workers have the signal, and the call is still upstream.
        wait_until(lambda: sum("] proxy.cli.worker: stopping" in line for line in gate.output) == 2,
                   what="the workers to stop")
        release.set()
        in_flight.join(30)
        assert gate.process.wait(30) == 0
    assert answer == [200]
    assert not any(alive(pid) for pid in workers)
    assert decisions(f"sqlite:///{gate.database}") == 1


def test_a_killed_worker_is_replaced_and_the_others_serve_on(tmp_path, policy_dir, upstream):
    gate = start_workers(tmp_path, policy_dir, upstream, None)
    try:
        killed, kept = gate.children()
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: any(f"proxy worker {killed} exited (killed by SIGKILL): starting another" in line
                               for line in gate.output), what="the supervisor to notice")
        wait_until(lambda: len(gate.children()) == 2 and killed not in gate.children(), what="a new worker")
        replacement = next(pid for pid in gate.children() if pid != kept)
        wait_until(lambda: any(f"proxy worker {replacement} serving" in line for line in gate.output),
                   what="the new worker to serve")
        assert calls_through(gate, upstream, CLIENTS, 2) == [200] * CLIENTS * 2
        assert gate.process.poll() is None
    finally:
        assert gate.stop() == 0


def test_a_call_held_in_a_worker_is_released_by_an_approval_through_the_supervisors_api(
        tmp_path, policy_dir, upstream):
    gate = start_workers(tmp_path, policy_dir, upstream, None, hold_max_wait=300)
    reviewer = {"Authorization": f"Bearer {APPROVERS['erin'][0]}"}
    stop = f"http://127.0.0.1:{upstream.http_port}/v1/instances/i-0abc/stop"  # escalated: a production host
    try:
        # A hold far longer than the test: only a wake-up across processes releases it in time.
        with ThreadPoolExecutor(1) as pool, httpx.Client(proxy=gate.proxy_url, timeout=300,
                                                         headers={"Prefer": "wait=300"}) as client:
            held = pool.submit(client.post, stop, json={"grace": 30})
            pending: list[dict] = []
            wait_until(lambda: pending.extend(httpx.get(f"{gate.api_url}/overrides?status=pending",
                                                        headers=reviewer, timeout=10).json()) or pending,
                       what="the override request")
            approved = httpx.post(f"{gate.api_url}/overrides/{pending[0]['id']}/approve", headers=reviewer,
                                  json={"reason": "on-call agreed"}, timeout=10)
            assert approved.json()["status"] == "granted"
            assert held.result(60).status_code == 200
        assert [call.path for call in upstream.calls] == ["/v1/instances/i-0abc/stop"]
    finally:
        assert gate.stop() == 0


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path, policy_dir, upstream):
    gate = start_workers(tmp_path, policy_dir, upstream, None)
    workers = gate.children()
    gate.process.kill()
    gate.process.wait(10)
    # No orphan keeps the port, serving without the API its held calls would wait on.
    wait_until(lambda: not any(alive(pid) for pid in workers), what="the workers to stop")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://localhost:{upstream.http_port}{ALLOWED}", proxy=gate.proxy_url, timeout=5)


def test_workers_run_in_the_supervisors_session_and_a_ctrl_c_reaches_the_supervisor_alone(tmp_path, policy_dir,
                                                                                            upstream):
    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream)
    # Started as a shell starts a command: a session and a process group of its own, the terminal's foreground.
    gate = start_cedargate(config, "--workers", "2", preexec_fn=os.setsid)
    try:
        supervisor = gate.process.pid
        workers = gate.children()
        assert len(workers) == 2
        # One session, so the scheduler weighs them as one program (the kernel's autogroup, when enabled)...
        assert [os.getsid(pid) for pid in workers] == [supervisor, supervisor]
        autogroup = Path(f"/proc/{supervisor}/autogroup")
        if autogroup.exists():
            group = autogroup.read_text().split()[0]
            assert [Path(f"/proc/{pid}/autogroup").read_text().split()[0] for pid in workers] == [group, group]
        # ... and each worker in a process group of its own, out of the foreground group a Ctrl-C goes to.
        assert all(os.getpgid(pid) not in (supervisor, os.getpgid(0)) for pid in workers)
        answer = httpx.get(f"http://localhost:{upstream.http_port}{ALLOWED}", proxy=gate.proxy_url, timeout=10)
        assert answer.status_code == 200
        os.killpg(supervisor, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert gate.process.wait(60) == 0
    finally:
        gate.stop()
    assert not any(alive(pid) for pid in workers), "a worker outlived its supervisor"


def start_together(configs: list[Path], *extra: str) -> list[Cedargate]:
    """`cedargate run` on each config at once (threads), each waited for until it listens."""
    started: list[Cedargate | BaseException] = [RuntimeError("not started")] * len(configs)

    def start(n: int) -> None:
        try:
            started[n] = start_cedargate(configs[n], *extra, timeout=60)
        except BaseException as exc:  # reported below, with the others stopped
            started[n] = exc

    threads = [threading.Thread(target=start, args=(n,)) for n in range(len(configs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gates = [gate for gate in started if isinstance(gate, Cedargate)]
    failures = [failure for failure in started if not isinstance(failure, Cedargate)]
    if failures:
        for gate in gates:
            gate.stop()
        raise AssertionError(f"{len(failures)} of {len(configs)} did not start: {failures[0]}")
    return gates


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_instances_starting_at_once_on_an_empty_postgresql_schema_all_start(tmp_path, policy_dir, upstream,
                                                                            database_url):
    configs = [write_config(tmp_path / f"cedargate-{n}.yaml", policy_dir, tmp_path / f"state-{n}", upstream,
                            database_url=database_url) for n in range(3)]
    gates = start_together(configs)
    try:
        for gate in gates:
            assert calls_through(gate, upstream, 2, 2) == [200] * 4
        wait_until(lambda: decisions(database_url) == 12, what="every call on the record")
    finally:
        codes = [gate.stop() for gate in gates]
    assert codes == [0, 0, 0]
    verified = gates[0].audit_verify(database_url)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_two_instances_on_one_new_state_dir_share_its_ca_and_its_record(tmp_path, policy_dir, upstream):
    state = tmp_path / "state"
    configs = [write_config(tmp_path / f"cedargate-{n}.yaml", policy_dir, state, upstream) for n in range(2)]
    gates = start_together(configs)
    try:
        for gate in gates:
            # Half over HTTPS, trusting the CA file in the state dir: both sign with the CA that file holds.
            assert calls_through(gate, upstream, 4, 3) == [200] * 12
        wait_until(lambda: decisions(f"sqlite:///{state / 'cedargate.db'}") == 24, what="every call on the record")

        # A third on the first one's port is refused at start, saying why, instead of sharing the port.
        taken = subprocess.run(
            [*gates[0].argv, "--listen-port", str(gates[0].proxy_port)], capture_output=True, text=True, timeout=60,
        )
        assert taken.returncode == 2
        assert re.search(rf"the proxy cannot listen on 127\.0\.0\.1:{gates[0].proxy_port}: .*in use", taken.stderr)
    finally:
        codes = [gate.stop() for gate in gates]
    assert codes == [0, 0]
    verified = gates[0].audit_verify()
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_status_shows_each_workers_limits_and_shadow_counts_and_their_sums(tmp_path, policy_dir, upstream):
    """/status is answered by the supervisor, which proxies nothing: what it says of the ceilings, held
    calls, connections and shadow judgements is the workers' (summed; each worker's, by pid, to an auditor
    only, at /status/processes), as the kernel and the calls made see them; a worker replaced drops out of
    the list, and what it counted stays in the sums."""
    shadow = candidate_policies(policy_dir, tmp_path / "shadow")  # it allows the stops, denies the listings
    approvers = {name: {"token_sha256": hashlib.sha256(token.encode()).hexdigest(), "roles": roles}
                 for name, (token, roles) in {**APPROVERS, "audra": ("audra-token-7", ["auditor"])}.items()}
    gate = start_workers(tmp_path, policy_dir, upstream, None, max_held_calls=1, max_proxy_connections=20,
                         override_rate=100, shadow_policy_dir=str(shadow), approvers=approvers)
    reviewer = {"Authorization": f"Bearer {APPROVERS['erin'][0]}"}
    auditor = {"Authorization": "Bearer audra-token-7"}

    def status() -> dict:
        return httpx.get(f"{gate.api_url}/status", timeout=10).json()

    def each() -> list[dict]:
        return httpx.get(f"{gate.api_url}/status/processes", headers=auditor, timeout=10).raise_for_status().json()

    def escalate(n: int) -> httpx.Response:  # a production stop: held, on a connection of its own
        with httpx.Client(proxy=gate.proxy_url, timeout=60) as client:
            return client.post(f"http://127.0.0.1:{upstream.http_port}/v1/instances/i-{n}/stop")

    try:
        workers = sorted(gate.children())
        limits = status()["limits"]
        # Unauthenticated, /status says no pid and no worker's own load: only the sums.
        assert "processes" not in limits and "pid" not in str(limits)
        assert httpx.get(f"{gate.api_url}/status/processes", timeout=10).status_code == 401
        assert httpx.get(f"{gate.api_url}/status/processes", headers=reviewer, timeout=10).status_code == 403
        assert [p["pid"] for p in each()] == workers and limits["proxy_workers"] == 2
        assert [(p["max_held_calls"], p["max_proxy_connections"]) for p in each()] == [(1, 20)] * 2
        assert (limits["max_held_calls"], limits["max_proxy_connections"], limits["held_calls"]) == (2, 40, 0)

        with ThreadPoolExecutor(4) as pool:
            # One escalation after another: a worker holds one, and answers the next it is given at once.
            calls, answered = [], []
            for n in range(4):
                calls.append(pool.submit(escalate, n))
                held = len(calls) - len(answered)
                wait_until(lambda: calls[-1].done() or status()["limits"]["held_calls"] == held,
                           what=f"escalation {n} held or answered")
                if calls[-1].done():
                    assert calls[-1].result().json()["held"] is False
                    answered.append(n)
            held = 4 - len(answered)
            assert 1 <= held <= 2
            wait_until(lambda: status()["limits"]["agent_connections"] == held, what="answered connections closed")
            limits, processes = status()["limits"], each()
            kernel = connections_by_process(gate.proxy_port, workers)
            assert {p["pid"]: (p["held_calls"], p["agent_connections"]) for p in processes} == {
                pid: (count, count) for pid, count in kernel.items()}
            assert (limits["held_calls"], limits["not_held"]) == (held, len(answered))
            assert sum(p["not_held"] for p in processes) == len(answered)

            with httpx.Client(proxy=gate.proxy_url, timeout=10) as client:  # live allows, shadow would deny
                assert [client.get(f"http://localhost:{upstream.http_port}{ALLOWED}").status_code
                        for _ in range(3)] == [200] * 3
            judged = {"evaluated": 7, "disagreements": 7, "skipped": 0, "lost": 0}
            wait_until(lambda: {k: status()["shadow"][k] for k in judged} == judged, what="7 calls judged")

            # A worker holding a call is killed: its replacement is listed instead; its counts stay summed.
            killed = next(pid for pid, count in kernel.items() if count)
            os.kill(killed, signal.SIGKILL)
            wait_until(lambda: len(gate.children()) == 2 and killed not in gate.children(), what="a new worker")
            now = sorted(gate.children())
            wait_until(lambda: [p["pid"] for p in each()] == now, what="the new worker listed")
            limits = status()["limits"]
            assert (limits["held_calls"], limits["not_held"]) == (held - 1, len(answered))
            assert {k: status()["shadow"][k] for k in judged} == judged

            for request in httpx.get(f"{gate.api_url}/overrides?status=pending", headers=reviewer, timeout=10).json():
                httpx.post(f"{gate.api_url}/overrides/{request['id']}/deny", headers=reviewer,
                           json={"reason": "not now"}, timeout=10)
            ended = [call.exception(30) or call.result().status_code for call in calls]
        assert sum(isinstance(end, httpx.HTTPError) for end in ended) == 1  # the killed worker's held call
    finally:
        assert gate.stop() == 0
