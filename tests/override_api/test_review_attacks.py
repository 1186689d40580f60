"""What an attacker's requests get from the review page's API: each is refused with the answer a client
can act on, never a server error. A real core, a real SQLite record, the API over TestClient."""

from __future__ import annotations

from fastapi.testclient import TestClient
from test_override_routes import assert_problem, escalated_stop
from test_review_sessions import approvers, sign_in  # noqa: F401  (approvers: the module's fixture)

from proxy.runtime import Runtime


def test_a_csrf_token_that_is_not_ascii_is_refused_as_wrong(client: TestClient, runtime: Runtime):
    # hmac.compare_digest raises TypeError on a str that is not ASCII, and a header is read as Latin-1.
    stop = escalated_stop(runtime)
    sign_in(client)

    refused = client.post(f"/overrides/{stop}/approve", json={"reason": "sure"},
                          headers={"X-CSRF-Token": b"\xe9" * 64})
    signed_out = client.request("DELETE", "/session", headers={"X-CSRF-Token": b"\xe9" * 64})

    assert_problem(refused, 403, "missing or wrong X-CSRF-Token")
    assert_problem(signed_out, 403, "missing or wrong X-CSRF-Token")
    assert client.get(f"/overrides/{stop}").json()["status"] == "pending"
