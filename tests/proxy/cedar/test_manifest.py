"""The action manifest: routes to named actions, typed fields, refusals that name the field, the schema."""

from __future__ import annotations

import re
from pathlib import Path

import cedarpy
import pytest
import yaml

from proxy.cedar.manifest import FieldError, ManifestError, extract_fields, load_manifest, schema_text

PAYMENTS = {
    "hosts": [
        {
            "host": "api.payments.example",
            "routes": [
                {
                    "route": "POST /v1/refunds/{order_id}",
                    "action": "process_refund",
                    "severity": "high",
                    "reversible": False,
                    "groups": ["write"],
                    "fields": {
                        "order_id": {"from": "path", "type": "String"},
                        "amount": {"from": "body", "type": "Decimal"},
                        "currency": {"from": "body", "type": "String", "required": False},
                        "notify": {"from": "query", "type": "Bool", "required": False},
                        "attempt": {"from": "body", "at": "meta.attempt", "type": "Long", "required": False},
                    },
                },
                {"route": "GET /v1/refunds/{order_id}", "action": "read_refund", "severity": "low",
                 "fields": {"order_id": {"from": "path"}}},
            ],
        },
        {"host": "*.internal.example", "unknown": "http",
         "routes": [{"route": "DELETE /v1/cache", "action": "flush_cache"}]},
    ]
}


def write(tmp_path: Path, manifest) -> Path:
    (tmp_path / "actions.yaml").write_text(yaml.safe_dump(manifest) if not isinstance(manifest, str) else manifest)
    return tmp_path


@pytest.fixture
def manifest(tmp_path):
    return load_manifest(write(tmp_path, PAYMENTS))


def test_no_manifest_file_means_no_manifest(tmp_path):
    assert load_manifest(tmp_path) is None


def test_a_route_matches_with_its_path_parameters(manifest):
    host, match = manifest.match("api.payments.example", "POST", "/v1/refunds/o-77")
    assert host.host == "api.payments.example"
    assert match.route.action == "process_refund" and dict(match.params) == {"order_id": "o-77"}
    assert manifest.match("api.payments.example", "get", "/v1/refunds/o-1")[1].route.action == "read_refund"


@pytest.mark.parametrize("method, path", [
    ("DELETE", "/v1/refunds/o-77"),          # no such method for the path
    ("POST", "/v1/refunds/o-77/extra"),      # a parameter is one segment, never a slash
    ("POST", "/v1/refunds/"),                # an empty parameter is no parameter
    ("POST", "/v1/refundsX/o-1"),
])
def test_a_call_matching_no_route_on_a_manifest_host_is_unknown(manifest, method, path):
    host, match = manifest.match("api.payments.example", method, path)
    assert host is not None and host.unknown == "refuse" and match is None


def test_hosts_without_a_manifest_and_glob_hosts(manifest):
    assert manifest.match("api.other.example", "POST", "/v1/refunds/o-1") == (None, None)
    host, match = manifest.match("cache.internal.example", "DELETE", "/v1/cache")
    assert host.unknown == "http" and match.route.action == "flush_cache"
    assert manifest.match("internal.example", "DELETE", "/v1/cache") == (None, None)


def test_fields_become_typed_cedar_values_with_the_classification(manifest):
    _, match = manifest.match("api.payments.example", "POST", "/v1/refunds/o-77")
    values = extract_fields(match, {"notify": "true"},
                            {"amount": 600, "currency": "EUR", "meta": {"attempt": 2}})
    assert values == {
        "severity": "high", "reversible": False, "order_id": "o-77",
        "amount": {"__extn": {"fn": "decimal", "arg": "600.0"}}, "currency": "EUR", "notify": True, "attempt": 2,
    }
    # A JSON float arrives already converted to a Cedar decimal by the mapping.
    converted = {"__extn": {"fn": "decimal", "arg": "600.5"}}
    assert extract_fields(match, {}, {"amount": converted})["amount"] == converted


@pytest.mark.parametrize("query, body, message", [
    ({}, {}, "field 'amount' (body 'amount') is required"),
    ({}, {"amount": "lots"}, "field 'amount' must be a Decimal"),
    ({}, {"amount": True}, "field 'amount' must be a Decimal"),
    ({}, {"amount": 1, "currency": 5}, "field 'currency' must be a String"),
    ({"notify": "yes"}, {"amount": 1}, "field 'notify' must be a Bool"),
    ({}, {"amount": 1, "meta": {"attempt": "2"}}, "field 'attempt' must be a Long"),
])
def test_a_missing_or_mistyped_field_is_refused_naming_it(manifest, query, body, message):
    _, match = manifest.match("api.payments.example", "POST", "/v1/refunds/o-77")
    with pytest.raises(FieldError, match=re.escape(message)):
        extract_fields(match, query, body)


@pytest.mark.parametrize("manifest_text, message", [
    ("hosts: [{host: x, routes: [{route: 'FETCH /x', action: a}]}]", "hosts[0].routes[0] (FETCH /x).route"),
    ("hosts: [{host: x, routes: [{route: 'POST /x', action: 'not a name'}]}]", "(POST /x).action"),
    ("hosts: [{host: x, routes: [{route: 'POST /x/{id}', action: a, fields: {amount: {from: path}}}]}]",
     "path parameter {amount}"),
    ("hosts: [{host: x, routes: [{route: 'POST /x', action: a, fields: {path: {from: body}}}]}]",
     "field 'path' must be a name and not one of"),
    ("hosts: [{host: x, routes: [{route: 'POST /x', action: a, fields: {n: {from: body, type: Float}}}]}]",
     "fields.n.type"),
    ("hosts: [{host: x, routes: [{route: 'POST /x', action: a, colour: red}]}]", "colour"),
    ("hosts: [{host: x, routes: [{route: 'POST /x', action: a, severity: high}, "
     "{route: 'POST /y', action: a, severity: low}]}]", "hosts[0].routes[1] (POST /y): action 'a' is used"),
    ("hosts: [{host: x\n", "cannot be read as YAML"),
])
def test_manifest_errors_name_file_entry_and_field(tmp_path, manifest_text, message):
    with pytest.raises(ManifestError) as refused:
        load_manifest(write(tmp_path, manifest_text))
    assert "actions.yaml" in str(refused.value) and message in str(refused.value)


def test_generated_schema_is_valid_cedar_and_validates_business_rule_policies(manifest):
    schema = cedarpy.Schema.from_str(
        (Path(__file__).resolve().parents[3] / "policies" / "schema.cedarschema").read_text() + schema_text(manifest)
    )
    good = ('@id("big-refunds") forbid (principal, action == Action::"process_refund", resource)\n'
            'when { context.amount.greaterThan(decimal("500.0")) && !context.reversible };\n'
            '@id("writes") permit (principal, action in Action::"write", resource);')
    assert cedarpy.validate_policies(good, schema).validation_passed
    typo = '@id("t") forbid (principal, action == Action::"process_refund", resource) when { context.amout == 1 };'
    assert not cedarpy.validate_policies(typo, schema).validation_passed


def test_five_hundred_routes_match_the_right_one(tmp_path):
    routes = [{"route": f"POST /v1/svc-{i}/items/{{item_id}}", "action": f"act_{i}",
               "fields": {"item_id": {"from": "path"}}} for i in range(500)]
    manifest = load_manifest(write(tmp_path, {"hosts": [{"host": "api.example", "routes": routes}]}))
    for i in (0, 250, 499):
        _, match = manifest.match("api.example", "POST", f"/v1/svc-{i}/items/it-{i}")
        assert match.route.action == f"act_{i}" and match.params == {"item_id": f"it-{i}"}


# ---- the manifest in the mapping and the gate -------------------------------------------------------

from proxy.calls.mapping import Call, MappingError, MappingOptions, UnknownAction, map_call  # noqa: E402


def call(method: str, path: str, body: bytes = b"", query: str = "", host: str = "api.payments.example") -> Call:
    headers = {"Content-Type": "application/json"} if body else {}
    return Call("billing-bot", method, "https", host, 443, path, query, headers, body)


def test_a_route_maps_to_its_named_action_with_typed_context(manifest):
    request = map_call(call("POST", "/v1/refunds/o-9", b'{"amount": 600.25, "currency": "EUR"}', "notify=true"),
                       MappingOptions(), manifest)
    assert request.action == ("Action", "process_refund")
    context = request.context
    assert (context["order_id"], context["currency"], context["notify"], context["severity"]) == (
        "o-9", "EUR", True, "high")
    assert context["amount"] == {"__extn": {"fn": "decimal", "arg": "600.25"}}
    assert context["reversible"] is False and context["path"] == "/v1/refunds/o-9"


def test_unknown_routes_are_refused_unless_the_host_falls_back_to_http(manifest):
    with pytest.raises(UnknownAction) as refused:
        map_call(call("DELETE", "/v1/refunds/o-9"), MappingOptions(), manifest)
    assert refused.value.status == 403 and "actions.yaml" in str(refused.value)
    fallback = map_call(call("GET", "/v1/stats", host="cache.internal.example"), MappingOptions(), manifest)
    assert fallback.action == ("Action", "get")
    other = map_call(call("DELETE", "/v1/refunds/o-9", host="elsewhere.example"), MappingOptions(), manifest)
    assert other.action == ("Action", "delete")


def test_a_repeated_query_parameter_cannot_show_the_policy_one_value(manifest):
    with pytest.raises(MappingError, match="field 'notify' must be a Bool"):
        map_call(call("POST", "/v1/refunds/o-9", b'{"amount": 1}', "notify=false&notify=true"),
                 MappingOptions(), manifest)


def test_the_gate_refuses_unknown_actions_and_escalates_by_field(policy_dir):
    from proxy.cedar.engine import Engine
    from proxy.decision.gate import Gate, Outcome, Problem

    gate = Gate(Engine(policy_dir), recorder=None)
    unknown = gate.decide(call("PATCH", "/v1/refunds/o-1", b'{"amount": 1}'))
    assert (unknown.outcome, unknown.problem, unknown.status) == (Outcome.DENY, Problem.UNKNOWN_ACTION, 403)
    large = gate.decide(call("POST", "/v1/refunds/o-1", b'{"amount": 500.01, "currency": "EUR"}'))
    assert large.outcome is Outcome.ESCALATE and [p.policy_id for p in large.determining] == ["large-refunds"]
    exactly = gate.decide(call("POST", "/v1/refunds/o-1", b'{"amount": 500, "currency": "EUR"}'))
    assert exactly.outcome is Outcome.ALLOW
    missing = gate.decide(call("POST", "/v1/refunds/o-1", b'{"currency": "EUR"}'))
    assert (missing.outcome, missing.problem, missing.status) == (Outcome.ERROR, Problem.MAPPING_ERROR, 400)
    assert "field 'amount'" in missing.detail


def test_a_stale_generated_schema_refuses_the_set(policy_dir):
    from proxy.cedar.policy import PolicyLoadError, load_bundle

    manifest_file = policy_dir / "actions.yaml"
    manifest = yaml.safe_load(manifest_file.read_text())
    manifest["hosts"][0]["routes"].append({"route": "GET /v1/payouts", "action": "list_payouts"})
    manifest_file.write_text(yaml.safe_dump(manifest))
    with pytest.raises(PolicyLoadError, match="actions.cedarschema does not match actions.yaml"):
        load_bundle(policy_dir)
