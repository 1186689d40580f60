"""The one canonical JSON: each persisted byte form is the one written before it existed.

The audit chain's hashes and the override fingerprints are in existing databases. Each test computes
a known record's bytes both with the `json.dumps` call the code used before and with `canonical`, and
pins the hashes the previous release computed, so a change of either shows here.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from proxy.calls.mapping import Call
from proxy.calls.mcp.jsonrpc import read_message
from proxy.oversight.overrides import fingerprint
from proxy.record.audit import entry_hash
from proxy.vocabulary.canonical import Form, canonical, canonical_text

# Non-ASCII, an astral character, a lone surrogate (an undecodable byte), a control and nesting.
AWKWARD = {"b": ["caf\u00e9", "\U0001f600", "\ud800", "tab\there", "\x7f"], "a": {"z": 1, "y": None, "x": 2.5},
           "at": "2026-01-02T03:04:05+00:00", "n": -7, "t": True}


def test_standard_is_the_audit_chains_form():
    old = json.dumps(AWKWARD, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical(AWKWARD) == old.encode("utf-8", "backslashreplace")
    assert canonical_text(AWKWARD) == old.encode("utf-8", "backslashreplace").decode("utf-8")


def test_datetimes_are_iso_and_other_objects_refused():
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert canonical({"at": at}) == b'{"at":"2026-01-02T03:04:05+00:00"}'
    with pytest.raises(TypeError, match="not set"):
        canonical({"x": {1}})


def test_ascii_is_the_mcp_bindings_form():
    old = json.dumps(AWKWARD, sort_keys=True, separators=(",", ":")).encode()
    assert canonical(AWKWARD, Form.ASCII) == old


def test_fingerprint_form_is_the_override_fingerprints_form():
    old = json.dumps(AWKWARD, sort_keys=True).encode()
    assert canonical(AWKWARD, Form.FINGERPRINT) == old


def test_a_known_audit_row_hashes_as_the_previous_release_did():
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    payload = '{"note":"caf\u00e9 \ud800","n":1}'
    content = {"seq": 7, "at": "2026-01-02T03:04:05.678901+00:00", "kind": "decision", "decision_id": "d-1",
               "override_id": None, "agent": "agent-\u00e9", "actor": None, "payload": payload,
               "prev_hash": "ab" * 32}
    old = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected = hashlib.sha256(old.encode("utf-8", "backslashreplace")).hexdigest()
    computed = entry_hash(7, at, "decision", "d-1", None, "agent-\u00e9", None, payload, "ab" * 32)
    assert computed == expected == "843ac83ffb310d6804e800267e19234f254cf6bf60a732853bc0ba70f093c418"


CALL = Call(agent="ops-bot", method="post", scheme="https", host="API.Example.", port=443, path="/v1/x",
            query="a=1", headers={"Content-Type": "application/json", "X-Note": "na\u00efve",
                                  "Authorization": "Bearer t", "Connection": "keep-alive"}, body=b'{"a":1}')


def test_a_known_call_has_the_fingerprint_the_previous_release_stored():
    assert fingerprint(CALL) == "633455c8307a617d8093f1e7fd89e6928c6c176882acdd7c5b138dd2127f510d"


def test_a_known_mcp_message_binds_and_fingerprints_as_before():
    message = read_message({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
        "name": "search", "arguments": {"q": "caf\u00e9 \U0001f600"}, "_meta": {"progressToken": 5, "x": 1}}},
        "the body")
    binding = message.binding()
    assert binding == (b'{"jsonrpc":"2.0","method":"tools/call","params":{"_meta":{"x":1},'
                       b'"arguments":{"q":"caf\\u00e9 \\ud83d\\ude00"},"name":"search"}}')
    assert fingerprint(CALL, binding) == "28c2c25a900ce5bf7b731f9f6ab0bd449979909127d70506756149eab31f5895"
