"""At the limits: a proxy at its ceilings answers at once, keeps its reviewers in, and does not flood its log.

The real `cedargate run` with small ceilings (`max_held_calls`, `max_proxy_connections`) or a low
open-file limit (set in the child with `resource.setrlimit`), the logging upstream, httpx agents and raw
sockets. Each wait is a bounded poll for something that must happen, never a timing.
"""

from __future__ import annotations

import re
import resource
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from e2e_support import APPROVERS, start_cedargate, write_config

from tests.support.raw_http import assert_refused_saturated
from tests.support.waiting import wait_until

BOUND = 20.0


@pytest.fixture
def ceilings(tmp_path, policy_dir, upstream):
    """Ceilings of 5 held calls and 9 connections (agents' and upstream ones together)."""
    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream,
                          max_held_calls=5, max_proxy_connections=9, override_rate=100,
                          header_read_timeout=120.0, idle_timeout=120.0)
    gate = start_cedargate(config)
    upstream.reset()
    yield gate
    gate.stop()


def agent(gate) -> httpx.Client:
    return httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert),
                        timeout=60)


def api(gate, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {APPROVERS['erin'][0]}"}
    return httpx.request(method, f"{gate.api_url}{path}", headers=headers, timeout=BOUND, **kwargs)


def stop(upstream, n: int) -> str:
    return f"http://127.0.0.1:{upstream.http_port}/v1/instances/i-{n:04d}/stop"


def limits(gate) -> dict:
    return api(gate, "GET", "/status").json()["limits"]


def hold(pool: ThreadPoolExecutor, gate, upstream, count: int) -> list:
    """`count` escalated calls, each on its own connection, held; returns their futures once all are held."""
    def call(n: int) -> httpx.Response:
        with agent(gate) as http:
            return http.post(stop(upstream, n))

    futures = [pool.submit(call, n) for n in range(count)]
    wait_until(lambda: limits(gate)["held_calls"] == count, f"{count} calls held", BOUND)
    return futures


def test_past_the_held_ceiling_an_escalation_is_answered_at_once_and_approvals_still_release(ceilings, upstream):
    gate = ceilings
    with ThreadPoolExecutor(6) as pool:
        held = hold(pool, gate, upstream, 5)
        before = {o["id"] for o in api(gate, "GET", "/overrides?status=pending").json()}
        with agent(gate) as http:
            sixth = http.post(stop(upstream, 5))  # answered at once: no approval comes while it waits
            allowed = http.get(f"http://127.0.0.1:{upstream.http_port}/v1/instances")
        problem = sixth.json()
        assert sixth.status_code == 403 and problem["type"] == "urn:cedargate:problem:override-pending"
        assert problem["held"] is False and "max_held_calls" in problem["detail"]
        assert sixth.headers["Retry-After"] == "10"
        assert problem["override_id"] not in before  # its request is opened, for the reviewers to decide
        assert allowed.status_code == 200  # other traffic flows at the ceiling
        status = limits(gate)
        assert (status["held_calls"], status["max_held_calls"], status["not_held"]) == (5, 5, 1)
        assert httpx.get(f"{gate.api_url}/healthz", timeout=BOUND).status_code == 200

        # An approval releases a held call while the ceiling is reached; the sixth, approved, goes on retry.
        first = api(gate, "GET", "/overrides?status=pending").json()
        held_id = next(o["id"] for o in first if o["url"].endswith("i-0000/stop"))
        assert api(gate, "POST", f"/overrides/{held_id}/approve", json={"reason": "ok"}).status_code == 200
        assert held[0].result(BOUND).status_code == 200
        assert api(gate, "POST", f"/overrides/{problem['override_id']}/approve",
                   json={"reason": "ok"}).status_code == 200
        with agent(gate) as http:
            assert http.post(stop(upstream, 5)).status_code == 200
        for n in range(1, 5):  # the rest end as denied, so the test leaves nothing held
            found = next(o["id"] for o in first if o["url"].endswith(f"i-{n:04d}/stop"))
            api(gate, "POST", f"/overrides/{found}/deny", json={"reason": "not now"})
        assert [f.result(BOUND).status_code for f in held[1:]] == [403] * 4
    assert sorted(c.path for c in upstream.calls if c.method == "POST") == [
        "/v1/instances/i-0000/stop", "/v1/instances/i-0005/stop"]


def test_past_the_connection_ceiling_a_new_connection_is_refused_at_once_and_reviewers_get_in(ceilings,
                                                                                              upstream):
    gate = ceilings
    idle: list[socket.socket] = []
    with ThreadPoolExecutor(5) as pool:
        held = hold(pool, gate, upstream, 5)
        try:
            idle = [socket.create_connection(("127.0.0.1", gate.proxy_port), timeout=BOUND) for _ in range(4)]
            wait_until(lambda: limits(gate)["proxy_connections"] == 9, "9 connections open", BOUND)
            assert_refused_saturated(gate.proxy_port, b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                                     BOUND, 9)
            # A client of httpx (through the proxy) hears the same.
            with agent(gate) as http:
                assert http.get(f"http://127.0.0.1:{upstream.http_port}/v1/instances").status_code == 503

            # The reviewers' API answers, and an approval releases a held call, at the ceiling.
            assert httpx.get(f"{gate.api_url}/healthz", timeout=BOUND).status_code == 200
            status = limits(gate)
            assert status["max_proxy_connections"] == 9 and status["refused_connections"] >= 2
            scrape = httpx.get(f"{gate.api_url}/metrics", timeout=BOUND).text
            assert "cedargate_proxy_connections_ceiling 9.0" in scrape
            refused = re.search(r'cedargate_saturation_refusals_total\{kind="connection"\} (\S+)', scrape)
            assert refused and float(refused.group(1)) >= 2
            pending = api(gate, "GET", "/overrides?status=pending").json()
            released = next(o["id"] for o in pending if o["url"].endswith("i-0000/stop"))
            assert api(gate, "POST", f"/overrides/{released}/approve", json={"reason": "ok"}).status_code == 200
            assert held[0].result(BOUND).status_code == 200
        finally:
            for sock in idle:
                sock.close()
        # Once connections close, allowed calls flow again.
        wait_until(lambda: limits(gate)["proxy_connections"] <= 4, "idle connections closed", BOUND)
        with agent(gate) as http:
            assert http.get(f"http://127.0.0.1:{upstream.http_port}/v1/instances").status_code == 200
        for o in api(gate, "GET", "/overrides?status=pending").json():
            api(gate, "POST", f"/overrides/{o['id']}/deny", json={"reason": "not now"})
        assert [f.result(BOUND).status_code for f in held[1:]] == [403] * 4


def test_out_of_files_on_accept_backs_off_and_logs_once(tmp_path, policy_dir, upstream):
    """Ceilings set above what the open-file limit allows (an operator's mistake): accept runs out of
    files. The log says so once, not once per retry; once files are free again, calls and reviewers are
    served."""
    files = 256

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream,
                          max_proxy_connections=5000, max_held_calls=100, max_unauthenticated_connections=5000,
                          header_read_timeout=120.0, idle_timeout=120.0)
    gate = start_cedargate(config, preexec_fn=low_limit)
    try:
        flood: list[socket.socket] = []
        try:
            for _ in range(files + 50):  # more than the process has files: the rest wait in the listen queue
                try:
                    flood.append(socket.create_connection(("127.0.0.1", gate.proxy_port), timeout=2))
                except TimeoutError:
                    break  # the listen queue is full too
            wait_until(lambda: any("out of files" in line for line in gate.output), "the out-of-files line", BOUND)
            time.sleep(3)  # a while at the limit, retrying: the retries must not be logged one by one
            said = "".join(gate.output)
            assert said.count("out of files") == 1, said
            assert "socket.accept" not in said and "Unhandled error" not in said, said
            # Other parts needing a file meanwhile (the core's jobs: expiry, chains...) may each say so once,
            # not once a second.
            failed = re.findall(r" ERROR (\S+): (.* failed)$", said, re.M)
            assert len(failed) == len(set(failed)), said
        finally:
            for sock in flood:
                sock.close()
        wait_until(lambda: httpx.get(f"{gate.api_url}/healthz", timeout=BOUND).status_code == 200, "healthz answers",
                   BOUND)
        with agent(gate) as http:
            assert http.get(f"http://127.0.0.1:{upstream.http_port}/v1/instances").status_code == 200
    finally:
        gate.stop()  # also when the test fails: a cedargate left running would hold its ports and files
