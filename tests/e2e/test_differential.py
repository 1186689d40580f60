"""Differential: what the running proxy decides equals what Cedar itself decides.

For Hypothesis-generated calls sent through the real proxy, the expected outcome is computed here,
independently of cedargate's code: the Cedar request is built from the documented mapping, and the
policy files are handed to `cedarpy.is_authorized` as plain text (the full set, no slicing).
"""

from __future__ import annotations

import json
import shutil
import ssl
from pathlib import Path

import cedarpy
import httpx
import pytest
from e2e_support import AGENT, REPO, start_cedargate, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXTRA_POLICIES = """
// Agents may write to the audit host only with a JSON content type.
@id("audit-writes")
permit (principal in Team::"ops", action in Action::"write", resource)
when { context.path like "/v1/audit/*" && context.headers has "content-type" &&
       context.headers["content-type"] like "application/json*" };

// Nothing destructive over plain HTTP to production.
@id("prod-needs-tls")
@reason("Writes to production go over HTTPS only.")
forbid (principal, action in Action::"write", resource in Environment::"production")
when { context.scheme == "http" && context.query like "*force=1*" };
"""


@pytest.fixture(scope="module")
def differential_gate(tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("differential")
    policy_dir = tmp / "policies"
    shutil.copytree(REPO / "policies", policy_dir, ignore=shutil.ignore_patterns("tests"))
    (policy_dir / "extra.cedar").write_text(EXTRA_POLICIES)
    gate = start_cedargate(write_config(tmp / "c.yaml", policy_dir, tmp / "state", upstream))
    yield gate
    gate.stop()


def cedar_oracle(policy_dir: Path):
    text = "\n".join(p.read_text() for p in sorted(policy_dir.glob("*.cedar")))
    schema = "\n".join(p.read_text() for p in sorted(policy_dir.glob("*.cedarschema")))
    entities = cedarpy.Entities.from_json_str((policy_dir / "entities.json").read_text(), schema=schema)

    def decide(method: str, host: str, port: int, path: str, query: str, headers: dict, body) -> tuple[bool, set]:
        context = {"scheme": "http", "host": host, "port": port, "method": method, "path": path,
                   "query": query, "headers": headers}
        if body is not None:
            context["body"] = body
        result = cedarpy.is_authorized(
            {"principal": f'Agent::"{AGENT}"', "action": f'Action::"{method.lower()}"',
             "resource": f'Host::"{host}"', "context": context},
            text, entities,
        )
        ids = {result.diagnostics.id_annotations_by_reason.get(r, r) for r in result.diagnostics.reasons}
        return result.allowed and not result.diagnostics.errors, ids

    return decide


segments = st.sampled_from(["v1", "instances", "volumes", "audit", "i-1", "vol-2", "stop", "x"])
calls = st.fixed_dictionaries({
    "method": st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
    "host": st.sampled_from(["localhost", "127.0.0.1"]),
    "path": st.lists(segments, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s)),
    "query": st.sampled_from(["", "force=1", "a=b&force=1", "limit=5"]),
    "json": st.one_of(st.none(), st.dictionaries(st.sampled_from(["id", "n", "ok"]),
                                                 st.one_of(st.integers(-5, 5), st.booleans(), st.text(max_size=5)),
                                                 max_size=3)),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=calls)
def test_proxy_decision_equals_cedar_on_the_full_set(differential_gate, upstream, call):
    decide = cedar_oracle(differential_gate.policy_dir)
    trust = ssl.create_default_context(cafile=differential_gate.ca_cert)
    url = f"http://{call['host']}:{upstream.http_port}{call['path']}" + (f"?{call['query']}" if call["query"] else "")
    headers = {"Accept": "*/*", "User-Agent": "differential", "Prefer": "respond-async"}
    content = None
    if call["json"] is not None:
        headers["Content-Type"] = "application/json"
        content = json.dumps(call["json"]).encode()
    upstream.reset()
    with httpx.Client(proxy=differential_gate.proxy_url, verify=trust, timeout=10) as http:
        response = http.request(call["method"], url, headers=headers, content=content)

    lowered = {"accept": "*/*", "user-agent": "differential"}
    if content is not None:
        lowered["content-type"] = "application/json"
    allowed, determining = decide(call["method"], call["host"], upstream.http_port, call["path"], call["query"],
                                  lowered, call["json"])
    if allowed:
        assert response.status_code == 200
        assert len(upstream.calls) == 1
    else:
        assert response.status_code == 403
        assert upstream.calls == []
        problem = response.json() if call["method"] != "HEAD" else None
        if problem is not None:
            assert {p["id"] for p in problem["policies"]} == determining
