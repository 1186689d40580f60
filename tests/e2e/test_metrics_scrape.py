"""`GET /metrics` of a real `cedargate run` (one process, and `--workers 2`) after real calls through the
proxy: allowed, denied, escalated and held, approved through the API; one scrape counts them all."""

from __future__ import annotations

import sqlite3
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import APPROVERS, Cedargate, Upstream, recorded_rows, start_cedargate, write_config
from prometheus_client.parser import text_string_to_metric_families

from tests.support.candidates import start_with
from tests.support.upstream import logging_upstream
from tests.support.waiting import wait_until

INSTANCES = "/v1/instances"
STOP = "/v1/instances/i-0abc/stop"


def scrape(gate: Cedargate, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(f"{gate.api_url}/metrics", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")  # the text exposition format
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    return sum(v for (n, got), v in samples.items() if n == name and set(labels.items()) <= set(got))


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def gate(request, tmp_path, policy_dir, upstream: Upstream) -> Iterator[Cedargate]:
    config = write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream)
    started = start_cedargate(config, "--workers", str(request.param))
    try:
        yield started
    finally:
        started.stop()


def test_one_scrape_counts_the_calls_of_every_process(gate: Cedargate, upstream: Upstream) -> None:
    trust = ssl.create_default_context(cafile=str(gate.ca_cert))
    dev, production = f"http://localhost:{upstream.http_port}", f"http://127.0.0.1:{upstream.http_port}"
    # New connections each: under --workers 2 each goes to whichever worker takes it first (neither holds one).
    for _ in range(4):
        with httpx.Client(proxy=gate.proxy_url, verify=trust, timeout=30) as agent:
            assert agent.get(f"{dev}{INSTANCES}").status_code == 200
    with httpx.Client(proxy=gate.proxy_url, timeout=30) as agent:
        refused = agent.put(f"{dev}{INSTANCES}/i-0abc")
    assert refused.status_code == 403 and refused.json()["type"].endswith("no-permit")

    answers: list[httpx.Response] = []

    def held_call() -> None:
        with httpx.Client(proxy=gate.proxy_url, timeout=60) as agent:
            answers.append(agent.post(f"{production}{STOP}", headers={"X-Agent-Justification": "wedged"}))

    holder = threading.Thread(target=held_call)
    holder.start()
    try:
        wait_until(lambda: value(scrape(gate), "cedargate_held_calls") == 1, "the held call in the metrics")
        waiting = scrape(gate)
        assert value(waiting, "cedargate_override_requests", status="pending") == 1
        erin = {"Authorization": f"Bearer {APPROVERS['erin'][0]}"}
        [request] = httpx.get(f"{gate.api_url}/overrides?status=pending", headers=erin, timeout=10).json()
        approved = httpx.post(f"{gate.api_url}/overrides/{request['id']}/approve", headers=erin,
                              json={"reason": "checked with on-call"}, timeout=10)
        assert approved.status_code == 200, approved.text
    finally:
        holder.join(60)
    assert [a.status_code for a in answers] == [200]  # released: the upstream's answer

    rows = recorded_rows(gate, "SELECT decision, action FROM decisions", 6)
    get_action = next(r["action"] for r in rows if r["decision"] == "allow")
    samples = scrape(gate)
    assert value(samples, "cedargate_decisions_total", outcome="allow",
                 action=get_action.removeprefix('Action::"').removesuffix('"')) == 4
    assert value(samples, "cedargate_decisions_total", outcome="deny") == 1
    assert value(samples, "cedargate_decisions_total", outcome="escalate") == 1
    assert value(samples, "cedargate_decisions_total") == len(rows) == 6
    assert value(samples, "cedargate_decision_policies_total", outcome="allow", policy="ops-read") == 4
    assert value(samples, "cedargate_decision_policies_total", outcome="escalate",
                 policy="protect-production-instances") == 1
    assert value(samples, "cedargate_decision_policies_total", outcome="deny") == 0  # a default deny: no policy
    assert value(samples, "cedargate_held_calls") == 0
    assert value(samples, "cedargate_override_requests", status="released") == 1
    assert value(samples, "cedargate_override_requests", status="pending") == 0
    latency = dict(policy="protect-production-instances", decision="granted")
    assert value(samples, "cedargate_review_latency_seconds_count", **latency) == 1
    status = httpx.get(f"{gate.api_url}/status", timeout=10).json()
    marked_live = [dict(labels)["revision"] for (name, labels), v in samples.items()
                   if name == "cedargate_policy_revision" and v == 1]
    assert marked_live == [status["policies"]["revision"]]
    assert status["metrics"] == {"path": "/metrics", "shared_between_processes": True, "token_required": False}
    assert ("cedargate_store_queue_depth", ()) in samples and ("cedargate_store_lag_seconds", ()) in samples


def test_a_call_refused_because_the_store_failed_is_counted_as_an_error_not_allowed(
        tmp_path: Path, policy_dir: Path) -> None:
    (tmp_path / "upstream").mkdir()
    with logging_upstream(tmp_path / "upstream") as served:
        gate = start_with(tmp_path, policy_dir)
        try:
            url = f"http://localhost:{served.http_port}{INSTANCES}"
            with httpx.Client(proxy=gate.proxy_url, timeout=15) as agent:
                assert agent.get(url).status_code == 200
                with sqlite3.connect(gate.database) as db:  # the record breaks under the running proxy
                    db.execute("DROP TABLE decisions")
                # A call's row is journaled before it goes and committed a few ms later: the calls journaled
                # before the writer finds the store failing go (their rows kept); then calls are refused.
                answers = [agent.get(url)]
                while answers[-1].status_code == 200 and len(answers) < 200:
                    answers.append(agent.get(url))
                refused = answers.pop()
                assert refused.status_code == 503 and refused.json()["type"].endswith("store-unavailable")
            went = 1 + len(answers)  # the call before the table went, and those journaled before it was missed
            assert [c.path for c in served.calls] == [INSTANCES] * went
            samples = scrape(gate)
            assert value(samples, "cedargate_decisions_total", outcome="allow") == went  # those that went
            assert value(samples, "cedargate_decisions_total", outcome="error") == 1  # the one refused
        finally:
            gate.stop()


def test_a_second_cedargate_on_the_same_state_dir_leaves_the_first_ones_figures_alone(
        tmp_path: Path, policy_dir: Path, upstream: Upstream) -> None:
    """Two `cedargate run` may share a state directory (its CA and SQLite record): the second's start
    must not empty the metrics of the first, whose /metrics and /status (its workers' figures) go on
    counting its own processes, and only them."""
    state, allowed = tmp_path / "state", f"http://localhost:{upstream.http_port}{INSTANCES}"

    def calls(gate: Cedargate, count: int) -> None:
        with httpx.Client(proxy=gate.proxy_url, timeout=30) as agent:
            assert [agent.get(allowed).status_code for _ in range(count)] == [200] * count

    def limits(gate: Cedargate) -> dict:
        return httpx.get(f"{gate.api_url}/status", timeout=10).json()["limits"]

    first = start_cedargate(write_config(tmp_path / "first.yaml", policy_dir, state, upstream), "--workers", "2")
    try:
        calls(first, 3)
        wait_until(lambda: value(scrape(first), "cedargate_decisions_total", outcome="allow") == 3, "3 counted")
        ceilings = limits(first)["max_proxy_connections"]
        assert ceilings > 0
        second = start_cedargate(write_config(tmp_path / "second.yaml", policy_dir, state, upstream))
        try:
            calls(second, 2)
            wait_until(lambda: value(scrape(second), "cedargate_decisions_total", outcome="allow") == 2,
                       "the second's 2 counted")
            calls(first, 1)
            wait_until(lambda: value(scrape(first), "cedargate_decisions_total", outcome="allow") == 4,
                       "the first's 4 counted, and only them")
            assert limits(first)["max_proxy_connections"] == ceilings  # its workers' own, still read
        finally:
            assert second.stop() == 0
        assert value(scrape(first), "cedargate_decisions_total", outcome="allow") == 4
    finally:
        assert first.stop() == 0
