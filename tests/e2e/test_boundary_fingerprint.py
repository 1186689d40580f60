"""A grant is never reused for a call a real server would carry out differently, through the real proxy.

A retry that changes only how cedargate should answer (`Prefer: respond-async`, `wait=N`) or what the
agent says of its intent (`X-Agent-Justification`, `-Confidence`, `-Session`) is the same request. But
other preferences are instructions to the server: PostgREST commits or rolls back by `Prefer: tx=`,
upserts by `resolution=merge-duplicates`, and caps a DELETE by `max-affected=`; RFC 7240's
`handling=strict` makes a server refuse what `lenient` lets through. And an `X-Agent-*` header that is
not cedargate's own is just a header the upstream may act on. A call approved with one of those must not
release the same call with another.
"""

from __future__ import annotations

import ssl

import httpx
from e2e_support import APPROVERS

STOP = "/v1/instances/i-0abc/stop"
PROBLEM = "urn:cedargate:problem:"


def agent(gate) -> httpx.Client:
    return httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert), timeout=30)


def approve(gate, override_id: str) -> httpx.Response:
    return httpx.post(f"{gate.api_url}/overrides/{override_id}/approve", timeout=10,
                      headers={"Authorization": f"Bearer {APPROVERS['erin'][0]}"}, json={"reason": "a dry run"})


def test_a_grant_is_not_released_for_a_call_with_other_server_instructions(cedargate, upstream):
    url = f"http://127.0.0.1:{upstream.http_port}{STOP}"
    approved = {"Prefer": "respond-async, tx=rollback, max-affected=1", "X-Agent-Tenant": "sandbox"}
    with agent(cedargate) as http:
        first = http.post(url, json={"grace": 30}, headers=approved)
        assert first.status_code == 403 and first.json()["type"] == PROBLEM + "override-pending"
        granted_id = first.json()["override_id"]
        assert approve(cedargate, granted_id).json()["status"] == "granted"

        for other in ({"Prefer": "respond-async, tx=commit, max-affected=1", "X-Agent-Tenant": "sandbox"},
                      {"Prefer": "respond-async", "X-Agent-Tenant": "sandbox"},
                      {"Prefer": "respond-async, tx=rollback, max-affected=1", "X-Agent-Tenant": "production"}):
            refused = http.post(url, json={"grace": 30}, headers=other)
            assert refused.status_code == 403, other
            assert refused.json()["override_id"] != granted_id, other
        assert upstream.calls == []

        # Only how to answer, and what the agent says, may change: that is the granted call, released once.
        same = http.post(url, json={"grace": 30}, headers={
            "Prefer": "wait=5, tx=rollback, max-affected=1", "X-Agent-Tenant": "sandbox",
            "X-Agent-Justification": "a dry run, as approved"})
    assert same.status_code == 200
    [seen] = upstream.calls
    assert seen.headers["prefer"] == "wait=5, tx=rollback, max-affected=1"
    assert seen.headers["x-agent-tenant"] == "sandbox"
