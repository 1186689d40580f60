"""What held calls leave in memory is given back once they end, although held calls are kept out of the
collector's full passes (`proxy.oversight.heap`: frozen objects are never collected until handed back).

The real `cedargate run`, through `tests.support.heap_probe`, whose heap freezes from 4 held calls (the
real marks start at 200) and which, on SIGUSR1, runs a full collection and writes how many of its flows
and of its agents' connections are still alive. Held calls are approved, denied or left to end their
wait, each replaced by a new one, so the number held never falls: what the ended calls left must be
reclaimed all the same. Waits are bounded polls.
"""

from __future__ import annotations

import json
import signal
import ssl
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2e_support import APPROVERS, start_cedargate, write_config

from tests.support.launch import Cedargate
from tests.support.waiting import wait_until

BOUND = 30.0
LEVEL = 8  # calls held throughout


@pytest.fixture
def probed(tmp_path, policy_dir, upstream):
    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream,
                          override_rate=100, header_read_timeout=120.0, idle_timeout=120.0)
    gate = start_cedargate(config, heap_probe=tmp_path / "probe.json")
    upstream.reset()
    yield gate, tmp_path / "probe.json"
    gate.stop()


def api(gate: Cedargate, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {APPROVERS['erin'][0]}"}
    return httpx.request(method, f"{gate.api_url}{path}", headers=headers, timeout=BOUND, **kwargs)


def probe(gate: Cedargate, path: Path, count: list[int]) -> dict:
    count[0] += 1
    gate.process.send_signal(signal.SIGUSR1)

    def answered() -> dict | None:
        try:
            found = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return found if found["probe"] == count[0] else None

    return wait_until(answered, f"probe {count[0]} answered", BOUND)


def probe_until_alive(gate: Cedargate, path: Path, count: list[int], alive: int) -> dict:
    """Probes until `alive` flows and agents' connections are left alive, and the last. The agents' clients
    close their connections as they finish; the proxy learns of each close on its own time (on a busy
    machine, after the answer was read), so a connection can outlive its call by a moment."""

    def settled() -> dict | None:
        found = probe(gate, path, count)
        return found if (found["flows_alive"], found["connections_alive"]) == (alive, alive) else None

    return wait_until(settled, f"{alive} flows and connections alive", BOUND)


def test_held_calls_that_end_while_as_many_are_held_again_leave_nothing_behind(probed, upstream):
    gate, probe_file = probed
    probes = [0]
    held: dict[int, Future] = {}

    def call(n: int, wait: int) -> httpx.Response:
        with httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert),
                          timeout=120) as http:
            return http.post(f"http://127.0.0.1:{upstream.http_port}/v1/instances/i-{n:04d}/stop",
                             headers={"Prefer": f"wait={wait}"})

    def held_calls() -> int:
        return api(gate, "GET", "/status").json()["limits"]["held_calls"]

    def request_of(n: int) -> str:
        pending = api(gate, "GET", "/overrides?status=pending").json()
        return next(o["id"] for o in pending if o["url"].endswith(f"i-{n:04d}/stop"))

    with ThreadPoolExecutor(LEVEL + 2) as pool:
        for n in range(LEVEL):  # the last one asks to wait 3 s only: its hold ends unanswered
            held[n] = pool.submit(call, n, 3 if n == LEVEL - 1 else 600)
        wait_until(lambda: held_calls() == LEVEL, f"{LEVEL} calls held", BOUND)
        frozen = probe(gate, probe_file, probes)
        assert frozen["freezes"] >= 1 and frozen["flows_alive"] >= LEVEL

        ended = {LEVEL - 1: held.pop(LEVEL - 1).result(BOUND)}  # its wait over, the agent hears it is pending
        for n in range(5):  # then three approved and two denied
            verdict = "approve" if n < 3 else "deny"
            decided = api(gate, "POST", f"/overrides/{request_of(n)}/{verdict}", json={"reason": "test"})
            assert decided.status_code == 200
            ended[n] = held.pop(n).result(BOUND)
        # Each ended call was replaced as it went: none is left over from one round to the next.
        for n in range(LEVEL, LEVEL + len(ended)):
            held[n] = pool.submit(call, n, 600)
            wait_until(lambda n=n: held_calls() == len(held), f"{len(held)} calls held", BOUND)
        wait_until(lambda: probe(gate, probe_file, probes)["freezes"] > frozen["freezes"],
                   "the new calls frozen", BOUND)
        after = probe_until_alive(gate, probe_file, probes, LEVEL)

        for n in list(held):
            api(gate, "POST", f"/overrides/{request_of(n)}/deny", json={"reason": "done"})
            held.pop(n).result(BOUND)

    assert [ended[n].status_code for n in range(5)] == [200] * 3 + [403] * 2
    assert ended[LEVEL - 1].status_code == 403
    assert ended[LEVEL - 1].json()["type"] == "urn:cedargate:problem:override-pending"
    # As many calls held as before, and nothing of the six that ended is alive: their flows and their
    # connections (which end in reference cycles, so only a collection frees them) were freed.
    assert (after["flows_alive"], after["connections_alive"]) == (LEVEL, LEVEL)
    # What they left in reference cycles was handed back to the collector once six of the eight had ended.
    assert after["hand_backs"] == 1
    probe_until_alive(gate, probe_file, probes, 0)
