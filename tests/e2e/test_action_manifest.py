"""Tool-aware policies through the real proxy: manifest routes, typed fields, unknown actions."""

from __future__ import annotations

import ssl

import httpx
from e2e_support import start_cedargate, write_config

from tests.support.manifests import use_manifest

MANIFEST = {"hosts": [{"host": "localhost", "routes": [
    {"route": "POST /v1/refunds/{order_id}", "action": "process_refund", "severity": "high", "reversible": False,
     "groups": ["write"], "fields": {"order_id": {"from": "path"}, "amount": {"from": "body", "type": "Decimal"}}},
]}]}
POLICIES = """
@id("ops-refunds")
permit (principal in Team::"ops", action == Action::"process_refund", resource);

@id("large-refunds")
@reason("Refunds over 500 need a finance approver.")
@escalate("finance")
forbid (principal, action == Action::"process_refund", resource)
when { context.amount.greaterThan(decimal("500.0")) };

@id("irreversible-on-production")
@reason("Nothing irreversible on production hosts.")
forbid (principal, action, resource)
when { context has reversible && !context.reversible && resource.tags.contains("production-critical") };
"""


def test_manifest_routes_drive_allow_escalation_hard_deny_and_unknown_refusal(tmp_path, policy_dir, upstream):
    use_manifest(policy_dir, MANIFEST, POLICIES, into="payments.cedar", replaces="github.cedar")
    gate = start_cedargate(write_config(tmp_path / "c.yaml", policy_dir, tmp_path / "state", upstream))
    upstream.reset()
    base = f"http://localhost:{upstream.http_port}/v1/refunds"
    try:
        with httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert),
                          timeout=30, headers={"Prefer": "respond-async"}) as http:
            small = http.post(f"{base}/o-1", json={"amount": 120.5})
            large = http.post(f"{base}/o-2", json={"amount": 900})
            mistyped = http.post(f"{base}/o-3", json={"amount": "a lot"})
            unknown = http.delete(f"{base}/o-1")
            production = http.post(f"http://127.0.0.1:{upstream.http_port}/v1/refunds/o-4", json={"amount": 1})
    finally:
        gate.stop()
    assert small.status_code == 200
    assert large.status_code == 403 and large.json()["type"] == "urn:cedargate:problem:override-pending"
    assert large.json()["required_roles"] == ["finance"] and large.json()["action"] == 'Action::"process_refund"'
    assert mistyped.status_code == 400 and "field 'amount' must be a Decimal" in mistyped.json()["detail"]
    assert unknown.status_code == 403 and unknown.json()["type"] == "urn:cedargate:problem:unknown-action"
    # 127.0.0.1 has no manifest: its POST is the plain HTTP action, and the ops permits do not cover it.
    assert production.status_code == 403 and production.json()["type"] == "urn:cedargate:problem:no-permit"
    assert [(c.method, c.path) for c in upstream.calls] == [("POST", "/v1/refunds/o-1")]


def test_agent_headers_reach_the_policy_and_bad_ones_are_refused(cedargate, upstream):
    stop = f"http://localhost:{upstream.http_port}/v1/instances/i-1/stop"
    with httpx.Client(proxy=cedargate.proxy_url, verify=ssl.create_default_context(cafile=cedargate.ca_cert),
                      timeout=30, headers={"Prefer": "respond-async"}) as http:
        sure = http.post(stop, headers={"X-Agent-Confidence": "0.9", "X-Agent-Session": "incident-1"})
        unsure = http.post(stop, headers={"X-Agent-Confidence": "0.4",
                                          "X-Agent-Justification": "the logs look odd"})
        garbled = http.post(stop, headers={"X-Agent-Confidence": "very"})
    assert sure.status_code == 200
    # A low confidence routes a routine call to a human, by policy alone (low-confidence-writes).
    assert unsure.status_code == 403 and unsure.json()["type"] == "urn:cedargate:problem:override-pending"
    assert [p["id"] for p in unsure.json()["policies"]] == ["low-confidence-writes"]
    assert garbled.status_code == 400 and "X-Agent-Confidence" in garbled.json()["detail"]
    assert len(upstream.calls) == 1
    shown = httpx.get(f"{cedargate.api_url}/overrides/{unsure.json()['override_id']}",
                      headers={"Authorization": "Bearer erin-token-1"}).json()
    assert shown["justification"] == "the logs look odd"
