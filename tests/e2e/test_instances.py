"""Two real `cedargate run` processes on one database (a PostgreSQL schema, and one SQLite file), as a
load balancer would front them: a call held on one is released by an approval through the other's API,
an expiry ends it, identical calls through both at once open one request, and a grant whose released
call never reached the upstream is kept for the retry, which goes through once; the audit log verifies.

Each hold could last `HOLD` seconds: a call answered while its hold has that long still to run was
woken by the decision, not by the end of its hold.
"""

from __future__ import annotations

import json
import socket
import subprocess
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
    gates: list[Cedargate] = []
    try:
        for name in ("a", "b"):  # one after the other: starting together is another lane's test
            config = write_config(tmp_path / f"{name}.yaml", policy_dir, tmp_path / f"state-{name}", upstream,
                                  database_url=shared_url, hold_max_wait=HOLD)
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
    assert restored["upstream_failure"]["kind"] == "connect-refused"
    verified = subprocess.run([str(CEDARGATE), "audit", "verify", "--database-url", shared_url],
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def db_payload(store: sqlalchemy.Engine, override_id: str, kind: str) -> str:
    with store.connect() as db:
        return str(db.execute(sqlalchemy.text("SELECT payload FROM audit_log WHERE override_id = :id AND kind = :k"),
                              {"id": override_id, "k": kind}).scalar_one())
