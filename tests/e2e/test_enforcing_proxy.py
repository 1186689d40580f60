"""The enforcing proxy as an agent and an operator meet it: real cedargate, real upstream, httpx and curl."""

from __future__ import annotations

import json
import ssl
import subprocess
import time

import httpx
import pytest
from e2e_support import AGENT, TOKEN, recorded_rows, start_cedargate, write_config

STOP_PATH = "/v1/instances/i-0abc/stop"


def client(gate, **kwargs) -> httpx.Client:
    trust = ssl.create_default_context(cafile=gate.ca_cert)
    return httpx.Client(proxy=gate.proxy_url, verify=trust, timeout=10, **kwargs)


def records(gate, expected: int, timeout: float = 10.0) -> list[dict]:
    """Rows of the decision record, once the batching writer has committed `expected` of them."""
    return recorded_rows(gate, "SELECT * FROM decisions ORDER BY id", expected, timeout)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_allowed_call_reaches_upstream_unchanged_without_the_proxy_credential(cedargate, upstream, scheme):
    port = upstream.http_port if scheme == "http" else upstream.https_port
    with client(cedargate) as http:
        response = http.get(f"{scheme}://localhost:{port}/v1/instances?zone=a", headers={"X-Trace": "t-1"})
    assert response.status_code == 200
    assert response.json() == {"ok": True, "method": "GET", "path": "/v1/instances?zone=a"}
    [seen] = upstream.calls
    assert seen.headers["x-trace"] == "t-1"
    assert "proxy-authorization" not in seen.headers


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_denied_call_gets_problem_json_and_never_reaches_upstream(cedargate, upstream, scheme):
    port = upstream.http_port if scheme == "http" else upstream.https_port
    with client(cedargate) as http:
        # The forbid is escalatable; respond-async asks not to be held while a human looks.
        response = http.post(f"{scheme}://127.0.0.1:{port}{STOP_PATH}", json={"force": True},
                             headers={"Prefer": "respond-async"})
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "urn:cedargate:problem:override-pending"
    assert problem["status"] == 403
    assert problem["detail"].startswith("Stopping an instance on a production-critical host needs a human decision.")
    assert problem["policies"] == [{
        "id": "protect-production-instances", "effect": "forbid",
        "reason": "Stopping an instance on a production-critical host needs a human decision.",
    }]
    assert problem["decision_id"] == response.headers["x-cedargate-decision"]
    assert len(problem["policy_revision"]) == 64
    assert upstream.calls == []


def test_stop_on_dev_host_is_allowed_and_volume_delete_is_denied(cedargate, upstream):
    with client(cedargate) as http:
        stopped = http.post(f"http://localhost:{upstream.http_port}{STOP_PATH}")
        deleted = http.delete(f"http://localhost:{upstream.http_port}/v1/volumes/vol-9", headers={"Prefer": "wait=0"})
    assert stopped.status_code == 200
    assert deleted.status_code == 403
    assert deleted.json()["policies"][0]["id"] == "no-volume-deletion"
    assert [c.path for c in upstream.calls] == [STOP_PATH]


def test_default_deny_says_no_policy_permits(cedargate, upstream):
    with client(cedargate) as http:
        response = http.put(f"http://localhost:{upstream.http_port}/v1/instances/i-1", json={"size": "xl"})
    assert response.status_code == 403
    problem = response.json()
    assert problem["type"] == "urn:cedargate:problem:no-permit"
    assert "default deny" in problem["detail"]
    assert problem["policies"] == []
    assert upstream.calls == []


@pytest.mark.parametrize("credentials", [None, f"{AGENT}:wrong", f"nobody:{TOKEN}"])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_missing_or_wrong_credentials_get_407(cedargate, upstream, credentials, scheme):
    port = upstream.http_port if scheme == "http" else upstream.https_port
    proxy = f"http://{credentials + '@' if credentials else ''}127.0.0.1:{cedargate.proxy_port}"
    # curl shows the proxy's own answer to CONNECT, which httpx hides behind an exception.
    result = subprocess.run(
        ["curl", "-s", "-i", "--proxy", proxy, "--cacert", str(cedargate.ca_cert),
         f"{scheme}://localhost:{port}/v1/instances"],
        capture_output=True, text=True, timeout=20,
    )
    head = result.stdout.split("\r\n\r\n")[0]
    assert "407" in head.splitlines()[0]
    assert 'Proxy-Authenticate: Basic realm="cedargate"' in head
    assert upstream.calls == []


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_curl_through_the_proxy(cedargate, upstream, scheme):
    port = upstream.http_port if scheme == "http" else upstream.https_port
    base = ["curl", "-s", "--proxy", cedargate.proxy_url, "--cacert", str(cedargate.ca_cert),
            "-w", "\n%{http_code}"]
    allowed = subprocess.run([*base, f"{scheme}://localhost:{port}/v1/instances"],
                             capture_output=True, text=True, timeout=20)
    denied = subprocess.run([*base, "-H", "Prefer: respond-async", "-X", "DELETE",
                             f"{scheme}://localhost:{port}/v1/volumes/v-1"],
                            capture_output=True, text=True, timeout=20)
    body, code = allowed.stdout.rsplit("\n", 1)
    assert code == "200" and json.loads(body)["path"] == "/v1/instances"
    body, code = denied.stdout.rsplit("\n", 1)
    assert code == "403" and json.loads(body)["policies"][0]["id"] == "no-volume-deletion"
    assert [c.method for c in upstream.calls] == ["GET"]


def test_every_decision_is_recorded_without_secrets(cedargate, upstream):
    with client(cedargate) as http:
        http.get(f"http://localhost:{upstream.http_port}/v1/instances",
                 headers={"Authorization": "Bearer upstream-secret", "Cookie": "session=cookie-secret"})
        http.delete(f"http://localhost:{upstream.http_port}/v1/volumes/v-1", headers={"Prefer": "respond-async"})
        http.request("PROPFIND", f"http://localhost:{upstream.http_port}/dav")
    rows = records(cedargate, 3)
    assert [(r["method"], r["decision"], r["upstream_status"]) for r in rows] == [
        ("GET", "allow", 200), ("DELETE", "escalate", None), ("PROPFIND", "error", None),
    ]
    allow, deny, error = rows
    assert allow["agent"] == AGENT and allow["host"] == "localhost" and allow["path"] == "/v1/instances"
    assert allow["action"] == 'Action::"get"' and allow["resource"] == 'Host::"localhost"'
    assert json.loads(allow["determining_policies"]) == ["ops-read"]
    assert json.loads(deny["determining_policies"]) == ["no-volume-deletion"]
    assert "PROPFIND" in json.loads(error["errors"])[0]
    assert {r["policy_revision"] for r in rows[:2]} == {cedargate_status(cedargate)["policies"]["revision"]}
    assert all(r["duration_ms"] is not None for r in rows)
    dump = (cedargate.database.read_bytes() + (cedargate.state_dir / "cedargate.db-wal").read_bytes())
    assert b"upstream-secret" not in dump and b"cookie-secret" not in dump
    # The upstream does get the agent's own Authorization: only the proxy credential is removed.
    assert upstream.calls[0].headers["authorization"] == "Bearer upstream-secret"


def cedargate_status(gate) -> dict:
    return httpx.get(f"{gate.api_url}/status", timeout=5).json()


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_hot_reload_swaps_valid_sets_and_keeps_last_good_on_error(cedargate, upstream):
    url = f"http://localhost:{upstream.http_port}/v1/volumes/v-1"
    ops = cedargate.policy_dir / "ops.cedar"
    original = ops.read_text()
    first_revision = cedargate_status(cedargate)["policies"]["revision"]
    with client(cedargate, headers={"Prefer": "respond-async"}) as http:
        assert http.delete(url).status_code == 403

        # A broken edit is refused: the last good set stays live and the error is shown.
        ops.write_text(original + '\n@id("half-written")\npermit (principal, action, resource) when { ;\n')
        status = wait_for(lambda: (s := cedargate_status(cedargate))["policies"]["last_reload_error"] and s)
        assert "ops.cedar:" in status["policies"]["last_reload_error"]
        assert 'half-written' in status["policies"]["last_reload_error"]
        assert status["policies"]["revision"] == first_revision
        assert status["status"] == "degraded"
        assert http.delete(url).status_code == 403

        # A valid edit is swapped in whole.
        ops.write_text(original.replace("when { context.path like \"/v1/volumes/*\" }",
                                        "when { context.path like \"/v1/volumes/keep-*\" }")
                       + '\n@id("ops-delete")\n'
                       + 'permit (principal in Team::"ops", action == Action::"delete", resource);\n')
        status = wait_for(lambda: (s := cedargate_status(cedargate))["policies"]["revision"] != first_revision and s)
        assert status["policies"]["last_reload_error"] is None
        response = http.delete(url)
    assert response.status_code == 200
    rows = records(cedargate, 3)
    assert rows[-1]["policy_revision"] == status["policies"]["revision"] != rows[0]["policy_revision"]


def test_a_policy_that_errors_fails_closed_even_when_a_permit_matches(cedargate, upstream):
    # Schema-valid, but the multiplication overflows Cedar's Long at run time. Cedar skips a forbid
    # whose condition errors, which would let the `ops-read` permit through; cedargate must refuse.
    (cedargate.policy_dir / "guard.cedar").write_text(
        '@id("query-limit")\n@reason("limits must be small")\n'
        'forbid (principal, action == Action::"get", resource)\n'
        'when { context.query like "limit=*" && context.port * 4611686018427387904 > 0 };\n'
    )
    wait_for(lambda: "guard.cedar" in cedargate_status(cedargate)["policies"]["files"])
    with client(cedargate) as http:
        response = http.get(f"http://localhost:{upstream.http_port}/v1/instances?limit=5")
        unaffected = http.get(f"http://localhost:{upstream.http_port}/v1/instances")
    assert response.status_code == 403
    problem = response.json()
    assert problem["type"] == "urn:cedargate:problem:evaluation-error"
    assert "query-limit" in " ".join(problem["errors"])
    assert unaffected.status_code == 200
    assert [c.path for c in upstream.calls] == ["/v1/instances"]


def test_bad_json_body_is_refused_with_a_clear_reason(cedargate, upstream):
    with client(cedargate) as http:
        response = http.post(f"http://localhost:{upstream.http_port}{STOP_PATH}", content=b"{not json",
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["type"] == "urn:cedargate:problem:mapping-error"
    assert "does not parse" in response.json()["detail"]
    assert upstream.calls == []


def test_broken_policies_refuse_to_start_naming_file_line_and_id(tmp_path, policy_dir, upstream):
    (policy_dir / "extra.cedar").write_text(
        '// fine\n@id("ok") permit (principal, action == Action::"get", resource);\n\n'
        '@id("typo")\npermit (principal, action == Action::"get", resource) when { context.nope == 1 };\n'
    )
    config = write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream)
    with pytest.raises(RuntimeError) as failed:
        start_cedargate(config)
    message = str(failed.value)
    assert 'extra.cedar:4: @id("typo")' in message and "nope" in message


def test_non_loopback_bind_needs_an_explicit_flag(tmp_path, policy_dir, upstream):
    config = write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream,
                          proxy={"host": "0.0.0.0", "port": 0})
    with pytest.raises(RuntimeError) as refused:
        start_cedargate(config)
    assert "--allow-non-loopback" in str(refused.value)
    gate = start_cedargate(config, "--allow-non-loopback")
    try:
        assert any("non-loopback" in line for line in gate.output)
    finally:
        gate.stop()


def test_ca_key_is_private_to_its_owner(cedargate):
    assert (cedargate.state_dir / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0
    assert cedargate.state_dir.stat().st_mode & 0o077 == 0


def test_a_tunnel_carries_only_decided_http_never_raw_tcp(cedargate):
    import base64
    import socket
    import socketserver
    import threading

    received: list[bytes] = []

    class Sink(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.settimeout(3)
            try:
                while chunk := self.request.recv(4096):
                    received.append(chunk)
                    self.request.sendall(chunk)
            except OSError:
                pass

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def tunnel(credential: str) -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", cedargate.proxy_port), timeout=5) as conn:
            conn.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n"
                         f"Proxy-Authorization: {credential}\r\n\r\n".encode())
            answer = conn.recv(4096)
            after = b""
            if b" 200 " in answer.split(b"\r\n")[0] + b" ":
                conn.sendall(b"\x00exfiltrate secret data\r\n*1\r\n$4\r\nPING\r\n")
                try:
                    while chunk := conn.recv(4096):
                        after += chunk
                except OSError:
                    pass
            return answer, after

    try:
        valid = "Basic " + base64.b64encode(f"{AGENT}:{TOKEN}".encode()).decode()
        _, echoed = tunnel(valid)
        malformed, _ = tunnel("Basic \u00e9\u00e9")
        time.sleep(0.5)
    finally:
        server.shutdown()
    assert b"exfiltrate" not in echoed
    assert received == []  # not one byte of the non-HTTP stream reached the upstream
    assert malformed.startswith(b"HTTP/1.1 407")
