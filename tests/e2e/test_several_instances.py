"""Two real `cedargate run` processes on one database (a PostgreSQL schema, and one SQLite file), as a
load balancer would front them: a call held on one is released by an approval through the other's API,
an expiry ends it, identical calls through both at once open one request, and a grant whose released
call never reached the upstream is kept for the retry, which goes through once; the audit log verifies.

Each hold could last `HOLD` seconds: a call answered while its hold has that long still to run was
woken by the decision, not by the end of its hold.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier

import httpx
import pytest
import sqlalchemy
from e2e_support import CEDARGATE, Cedargate, start_cedargate, write_config
from test_escalation_flow import agent, api, approve, pending

from tests.support.upstream import plain_upstream_on

HOLD = 300  # seconds a held call may wait: far past any answer these tests wait for
ANSWER = 60  # seconds the tests wait for a held call's answer
STOP = "/v1/instances/i-0abc/stop"


@pytest.fixture
def shared_url(tmp_path, database_url) -> str:
    """One database for both instances: the PostgreSQL schema, or one SQLite file outside either's state."""
    return database_url or f"sqlite:///{tmp_path / 'shared.db'}"


@pytest.fixture
def expires() -> str:
    """How long an override request stays open (the policy's @expires); a test may set another."""
    return "30m"


@pytest.fixture
def two(tmp_path, policy_dir, upstream, shared_url, expires) -> Iterator[tuple[Cedargate, Cedargate]]:
    rules = policy_dir / "ops.cedar"
    rules.write_text(rules.read_text().replace('@expires("30m")', f'@expires("{expires}")', 1))
    with instances(tmp_path, policy_dir, upstream, shared_url, shared_url) as gates:
        yield gates


@contextlib.contextmanager
def instances(tmp_path, policy_dir, upstream, url_a: str, url_b: str) -> Iterator[tuple[Cedargate, Cedargate]]:
    """Instances A and B on the store each URL reaches, started one after the other (starting together
    is another test's subject), stopped at the end."""
    gates: list[Cedargate] = []
    try:
        for name, url in (("a", url_a), ("b", url_b)):
            config = write_config(tmp_path / f"{name}.yaml", policy_dir, tmp_path / f"state-{name}", upstream,
                                  database_url=url, hold_max_wait=HOLD)
            gates.append(start_cedargate(config))
        upstream.reset()
        yield gates[0], gates[1]
    finally:
        for gate in gates:
            gate.stop()


def stop_url(port: int, instance: str = "i-0abc") -> str:
    return f"http://127.0.0.1:{port}/v1/instances/{instance}/stop"


def test_a_call_held_on_one_instance_is_released_by_an_approval_through_the_other(two, upstream):
    a, b = two
    with ThreadPoolExecutor(1) as pool, agent(a) as http:
        held = pool.submit(http.post, stop_url(upstream.http_port), json={"grace": 30})
        [request] = pending(b)  # B's API lists what A holds: one store
        assert approve(b, request["id"]).json()["status"] == "granted"
        response = held.result(timeout=ANSWER)
    assert response.status_code == 200
    assert [c.path for c in upstream.calls] == [STOP]
    assert api(a, "GET", f"/overrides/{request['id']}").json()["status"] == "released"


@pytest.mark.parametrize("expires", ["1s"])
def test_an_expiry_ends_the_holds_on_both_instances(two, upstream):
    a, b = two
    with ThreadPoolExecutor(2) as pool, agent(a) as on_a, agent(b) as on_b:
        held = [pool.submit(on_a.post, stop_url(upstream.http_port, "i-exp-a")),
                pool.submit(on_b.post, stop_url(upstream.http_port, "i-exp-b"))]
        answers = [h.result(timeout=ANSWER) for h in held]
    assert [r.status_code for r in answers] == [403, 403]
    assert [r.json()["type"] for r in answers] == ["urn:cedargate:problem:override-expired"] * 2
    assert upstream.calls == []


def test_identical_calls_through_both_instances_at_once_open_one_request(two, upstream):
    a, b = two
    rounds = 10
    with ThreadPoolExecutor(2) as pool, agent(a, headers={"Prefer": "respond-async"}) as on_a, \
            agent(b, headers={"Prefer": "respond-async"}) as on_b:
        for round_ in range(rounds):
            start = Barrier(2)
            body = {"grace": round_}

            def send(http: httpx.Client, body: dict = body, start: Barrier = start) -> httpx.Response:
                start.wait()
                return http.post(stop_url(upstream.http_port), json=body)

            answers = list(pool.map(send, [on_a, on_b]))
            assert [r.status_code for r in answers] == [403, 403]
            assert len({r.json()["override_id"] for r in answers}) == 1, f"round {round_}: two requests"
    assert len(api(b, "GET", "/overrides?status=pending").json()) == rounds


def test_a_grant_whose_call_could_not_reach_the_upstream_is_kept_and_the_retry_goes_through_once(
        two, shared_url):
    a, b = two
    with socket.socket() as probe:  # a port nothing listens on: the upstream is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with ThreadPoolExecutor(1) as pool, agent(a) as http:
        held = pool.submit(http.post, stop_url(port), json={"grace": 30})
        [request] = pending(b)
        approve(b, request["id"])
        failed = held.result(timeout=ANSWER)
    assert failed.status_code == 502 and failed.headers["content-type"] == "application/problem+json"
    problem = failed.json()
    assert problem["type"] == "urn:cedargate:problem:override-grant-kept"
    assert problem["override_id"] == request["id"] and problem["grant_kept"] is True
    assert problem["executed"] == "no" and "grant is kept" in problem["detail"]
    assert api(b, "GET", f"/overrides/{request['id']}").json()["status"] == "granted"

    with plain_upstream_on(port) as seen, agent(b) as http:  # the upstream is back; retry through B
        retry = http.post(stop_url(port), json={"grace": 30})
        again = http.post(stop_url(port), json={"grace": 30}, headers={"Prefer": "respond-async"})
    assert retry.status_code == 200
    assert [(c.method, c.path) for c in seen] == [("POST", STOP)]  # once: the grant went with it
    assert again.status_code == 403 and again.json()["override_id"] != request["id"]
    assert api(a, "GET", f"/overrides/{request['id']}").json()["status"] == "released"

    store = sqlalchemy.create_engine(shared_url)
    try:
        deadline = time.monotonic() + 10
        while True:
            with store.connect() as db:
                story = [kind for (kind,) in db.execute(sqlalchemy.text(
                    "SELECT kind FROM audit_log WHERE override_id = :id ORDER BY seq"), {"id": request["id"]})]
            if story[-1:] == ["release"] and len(story) > 4 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        restored = json.loads(db_payload(store, request["id"], "grant_restored"))
    finally:
        store.dispose()
    assert story == ["override_created", "approval", "grant", "release", "grant_restored", "release"]
    assert restored["not_forwarded"]["kind"] == "connect-refused"
    verified = subprocess.run([str(CEDARGATE), "audit", "verify", "--database-url", shared_url],
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def db_payload(store: sqlalchemy.Engine, override_id: str, kind: str) -> str:
    with store.connect() as db:
        return str(db.execute(sqlalchemy.text("SELECT payload FROM audit_log WHERE override_id = :id AND kind = :k"),
                              {"id": override_id, "k": kind}).scalar_one())


class StoreLink:
    """Instance A's way to PostgreSQL: a TCP forwarder that an outage cuts (every connection closed, new
    ones refused) and that then comes back, while instance B reaches the server directly."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, direct: str) -> str:
        return direct.replace(f"@{self.target[0]}:{self.target[1]}/", f"@127.0.0.1:{self.port}/")

    def cut(self) -> None:
        self.up.clear()
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.open.clear()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.up.is_set():
                client.close()
                continue
            server = socket.create_connection(self.target)
            self.open += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def link() -> Iterator[StoreLink]:
    store_link = StoreLink()
    yield store_link
    store_link.close()


@pytest.fixture
def a_behind_link(tmp_path, policy_dir, upstream, database_url, link) -> Iterator[tuple[Cedargate, Cedargate]]:
    """A reaches the store through `link`, B directly; one PostgreSQL schema."""
    with instances(tmp_path, policy_dir, upstream, link.url(database_url), database_url) as gates:
        yield gates


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_call_approved_while_its_instances_store_is_away_is_released_when_the_store_is_back(
        a_behind_link, link, upstream):
    a, b = a_behind_link
    with ThreadPoolExecutor(1) as pool, agent(a) as http:
        held = pool.submit(http.post, stop_url(upstream.http_port), json={"grace": 30})
        [request] = pending(b)
        link.cut()
        assert approve(b, request["id"]).json()["status"] == "granted"  # B's store is up
        assert not held.done() and upstream.calls == []  # A cannot read the grant: it holds, refusing nothing
        link.restore()
        response = held.result(timeout=ANSWER)
    assert response.status_code == 200
    assert [c.path for c in upstream.calls] == [STOP]


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_hold_that_ends_while_the_store_is_away_is_answered_503_store_unavailable(a_behind_link, link, upstream):
    a, b = a_behind_link
    with ThreadPoolExecutor(1) as pool, agent(a, headers={"Prefer": "wait=3"}) as http:
        held = pool.submit(http.post, stop_url(upstream.http_port), json={"grace": 30})
        [request] = pending(b)
        link.cut()
        approve(b, request["id"])
        response = held.result(timeout=ANSWER)
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    problem = response.json()
    assert problem["type"] == "urn:cedargate:problem:store-unavailable"
    # Never the driver's words, nor where the store is.
    assert str(link.port) not in response.text and "5432" not in response.text
    assert "psycopg" not in response.text.lower() and "connection" not in problem["detail"].lower()
    assert upstream.calls == []
    assert api(b, "GET", f"/overrides/{request['id']}").json()["status"] == "granted"  # kept for the retry
