"""Signing in to the review page and what a session cookie may do: a real core, a real SQLite record, the
API over TestClient. Each check is what a reviewer (or an attacker's page in their browser) observes:
the cookie's flags, the answers, the store holding no usable token, the refusals and their details."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from test_override_routes import ROLES, assert_problem, escalated_stop

from proxy.record.store import utcnow
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential
from tests.support.approvers import credentials


@pytest.fixture
def approvers() -> dict[str, ApproverCredential]:
    return credentials(ROLES)


def sign_in(client: TestClient, name: str = "erin", **headers: str):
    return client.post("/session", json={"token": f"{name}-token"}, headers=headers)


def stored_sessions(runtime: Runtime) -> list[tuple[str, str]]:
    with sqlite3.connect(runtime.settings.state_dir / "cedargate.db") as con:
        return list(con.execute("SELECT token_sha256, approver FROM reviewer_sessions"))


def test_signing_in_sets_a_private_cookie_and_gives_the_csrf_token(client: TestClient, runtime: Runtime):
    signed_in = sign_in(client)

    assert signed_in.status_code == 200, signed_in.text
    body = signed_in.json()
    assert (body["approver"], body["roles"], body["idle_seconds"]) == ("erin", ["engineering-manager"], 1800)
    cookie = signed_in.headers["set-cookie"]
    assert cookie.startswith("cedargate_session=")
    flags = {flag.strip().lower() for flag in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/", "max-age=43200"} <= flags
    assert "secure" not in flags  # plain HTTP on loopback: a Secure cookie would never be sent back
    token = client.cookies["cedargate_session"]
    # Only the token's hash is stored: the database opens no session.
    assert stored_sessions(runtime) == [(hashlib.sha256(token.encode()).hexdigest(), "erin")]
    assert client.get("/session").json()["csrf_token"] == body["csrf_token"]


def test_the_cookie_reads_and_with_the_csrf_token_decides(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)
    csrf = sign_in(client).json()["csrf_token"]

    assert [o["id"] for o in client.get("/overrides").json()] == [stop]
    approved = client.post(f"/overrides/{stop}/approve", json={"reason": "checked"},
                           headers={"X-CSRF-Token": csrf, "Origin": "http://testserver",
                                    "Sec-Fetch-Site": "same-origin"})
    assert approved.status_code == 200, approved.text
    assert approved.json()["status"] == "granted"
    assert [v["approver"] for v in approved.json()["votes"]] == ["erin"]


@pytest.mark.parametrize("headers, detail", [
    ({}, "missing or wrong X-CSRF-Token"),
    ({"X-CSRF-Token": "0" * 64}, "missing or wrong X-CSRF-Token"),
    ({"Origin": "https://evil.example"}, "Origin https://evil.example is not http://testserver"),
    ({"Sec-Fetch-Site": "cross-site"}, "requested from another site (Sec-Fetch-Site: cross-site)"),
    ({"Sec-Fetch-Site": "same-site"}, "requested from another site (Sec-Fetch-Site: same-site)"),
])
def test_a_change_with_the_cookie_but_not_from_the_page_is_refused(
        client: TestClient, runtime: Runtime, headers: dict[str, str], detail: str):
    stop = escalated_stop(runtime)
    csrf = sign_in(client).json()["csrf_token"]
    sent = {"X-CSRF-Token": csrf, **headers} if "X-CSRF-Token" not in headers and headers else headers

    refused = client.post(f"/overrides/{stop}/approve", json={"reason": "sure"}, headers=sent)

    assert_problem(refused, 403, detail)
    assert client.get(f"/overrides/{stop}").json()["status"] == "pending"


def test_the_bearer_api_needs_no_csrf_token(client: TestClient, runtime: Runtime):
    stop = escalated_stop(runtime)
    approved = client.post(f"/overrides/{stop}/approve", json={"reason": "ok"},
                           headers={"Authorization": "Bearer erin-token"})
    assert approved.status_code == 200 and approved.json()["status"] == "granted"


def test_signing_out_ends_the_session(client: TestClient, runtime: Runtime):
    csrf = sign_in(client).json()["csrf_token"]
    token = client.cookies["cedargate_session"]

    refused = client.delete("/session")  # without the CSRF token another site could sign a reviewer out
    assert_problem(refused, 403, "missing or wrong X-CSRF-Token")
    signed_out = client.delete("/session", headers={"X-CSRF-Token": csrf})

    assert signed_out.status_code == 204
    assert "cedargate_session" not in client.cookies
    assert stored_sessions(runtime) == []
    client.cookies.set("cedargate_session", token)
    assert_problem(client.get("/overrides"), 401, "your session has ended")
    assert_problem(client.get("/session"), 401, "not signed in")


@pytest.mark.parametrize("column, ago", [("last_seen_at", timedelta(minutes=31)),  # idle too long
                                         ("created_at", None),  # past its absolute end
                                         ])
def test_an_idle_or_old_session_has_ended(client: TestClient, runtime: Runtime, column: str, ago):
    sign_in(client)
    now = utcnow()
    with sqlite3.connect(runtime.settings.state_dir / "cedargate.db") as con:
        if ago is not None:
            con.execute(f"UPDATE reviewer_sessions SET {column} = ?", (now - ago,))
        else:
            con.execute("UPDATE reviewer_sessions SET expires_at = ?", (now - timedelta(seconds=1),))

    assert_problem(client.get("/overrides"), 401, "your session has ended (signed out, idle or too old)")
    assert stored_sessions(runtime) == []


def test_a_used_session_stays_alive(client: TestClient, runtime: Runtime):
    sign_in(client)
    with sqlite3.connect(runtime.settings.state_dir / "cedargate.db") as con:
        con.execute("UPDATE reviewer_sessions SET last_seen_at = ?", (utcnow() - timedelta(minutes=29),))
    assert client.get("/overrides").status_code == 200
    with sqlite3.connect(runtime.settings.state_dir / "cedargate.db") as con:
        con.execute("UPDATE reviewer_sessions SET last_seen_at = datetime(last_seen_at, '-2 minutes')")
    # Marked used 29 minutes after the sign-in: 2 more minutes unused are within the idle lifetime.
    assert client.get("/overrides").status_code == 200


def test_a_session_ends_when_its_approver_token_is_rotated(runtime: Runtime, client: TestClient):
    sign_in(client)
    sessions = client.app.state.sessions  # type: ignore[attr-defined]
    token = client.cookies["cedargate_session"]
    assert sessions.find(token, lambda approver, credential: True) is not None
    assert sessions.find(token, lambda approver, credential: False) is None
    assert_problem(client.get("/overrides"), 401, "your session has ended")


def test_failed_sign_ins_are_throttled_per_client(client: TestClient):
    for _ in range(5):
        assert_problem(client.post("/session", json={"token": "guess"}), 401, "unknown approver token")
    throttled = sign_in(client)  # even the right token, until the bucket refills
    assert_problem(throttled, 429, "too many failed sign-ins from testclient: try again in ")
    # A token comes back every 12 s (5 a minute), less the moments the five failures took.
    assert 1 <= int(throttled.headers["retry-after"]) <= 12


def test_agents_and_other_sites_cannot_sign_in(client: TestClient, runtime: Runtime):
    assert_problem(sign_in(client, Origin="https://evil.example"), 403, "Origin https://evil.example")
    assert_problem(sign_in(client, **{"Sec-Fetch-Site": "cross-site"}), 403, "Sec-Fetch-Site: cross-site")
    assert stored_sessions(runtime) == []


def test_every_answer_carries_the_security_headers(client: TestClient):
    for path in ("/docs", "/healthz", "/overrides", "/session", "/static/docs.js"):
        headers = client.get(path).headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        policy = headers["content-security-policy"]
        assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy


def test_docs_are_served_from_local_files(client: TestClient):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text and "<script>" not in page.text
    bundle = client.get("/static/swagger-ui/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "SwaggerUIBundle" in bundle.text
    assert client.get("/static/swagger-ui/swagger-ui.css").status_code == 200
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc would load from a CDN
