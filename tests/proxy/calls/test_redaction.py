"""Query secrets: redacted by parameter name wherever a call is stored or shown, never in what is decided."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from proxy_support import make_call

from proxy.calls.redaction import REDACTED, Redaction
from proxy.cedar.engine import Engine
from proxy.decision.gate import Gate, Outcome, Verdict
from proxy.record.store import Recorder, make_engine
from proxy.vocabulary.problems import Problem

REDACT = Redaction()


@pytest.mark.parametrize(
    ("query", "shown"),
    [
        ("access_token=abc123&zone=a", f"access_token={REDACTED}&zone=a"),
        ("zone=a&API_KEY=k1&sig=s", f"zone=a&API_KEY={REDACTED}&sig={REDACTED}"),
        ("%74oken=t0k&code=", f"%74oken={REDACTED}&code="),  # an escaped name is the same name
        ("a=1;password=hunter2", f"a=1;password={REDACTED}"),  # some servers split on ;
        ("api_key[]=k&token", f"api_key[]={REDACTED}&token"),
        ("monkey=1&keys=2&sort_key=3", "monkey=1&keys=2&sort_key=3"),  # names, not substrings
        ("", ""),
    ],
)
def test_secret_parameters_are_redacted_by_name(query: str, shown: str):
    assert REDACT.query(query) == shown


def test_the_list_is_configurable():
    custom = Redaction.of(["X-Session"])
    assert custom.query("x-session=s1&token=t") == f"x-session={REDACTED}&token=t"


def test_a_url_keeps_everything_but_the_secret():
    assert REDACT.url("https://h:8443/p?sig=abc&x=1") == f"https://h:8443/p?sig={REDACTED}&x=1"
    assert REDACT.url("https://h/p") == "https://h/p"


def test_free_text_loses_the_secret_values_and_secret_pairs():
    text = "field 'key' must be a Long: 'sk_live_9f8e' is invalid; see http://h/p?token=ab&x=1"
    assert REDACT.text(text, "key=sk_live_9f8e&token=ab") == (
        f"field 'key' must be a Long: '{REDACTED}' is invalid; see http://h/p?token={REDACTED}&x=1")


def test_a_context_shows_its_query_redacted_and_values_taken_from_secrets():
    context = {"path": "/v1/x", "query": "key=sk_live_9f8e&n=1", "key": "sk_live_9f8e", "n": "1"}
    assert REDACT.context(context, context["query"]) == {
        "path": "/v1/x", "query": f"key={REDACTED}&n=1", "key": REDACTED, "n": "1"}


def test_recorded_errors_never_hold_a_query_secret(policy_dir: Path, tmp_path: Path):
    """A refusal's message may quote the query; the decision row and its audit payload are redacted."""
    database = tmp_path / "cedargate.db"
    recorder = Recorder(make_engine(f"sqlite:///{database}"))
    engine = Engine(policy_dir)
    try:
        gate = Gate(engine, recorder)
        call = make_call("GET", "http://localhost:9000/v1/instances?zone=a&access_token=tok_live_5e1f")
        allowed = gate.decide(call)
        assert allowed.allowed and allowed.request.context["query"] == call.query  # decided on as sent
        refused = Verdict(decision_id="d-1", outcome=Outcome.ERROR, call=call, at=allowed.at, started=0.0,
                          problem=Problem.MAPPING_ERROR, status=400,
                          detail=f"cannot read the query {call.query!r}", errors=("tok_live_5e1f is odd",))
        gate.finish(refused)
        assert recorder.flush(10)
    finally:
        recorder.close()
        engine.close()
    with sqlite3.connect(database) as db:
        [errors] = db.execute("SELECT errors FROM decisions WHERE decision_id = 'd-1'").fetchone()
        dump = "\n".join(db.iterdump())
    assert json.loads(errors) == [
        f"{REDACTED} is odd", f"cannot read the query 'zone=a&access_token={REDACTED}'"]
    assert "tok_live_5e1f" not in dump


def test_a_context_loses_what_came_from_a_secret_parameter_and_nothing_the_mapping_set_itself():
    """An agent chooses its query: a secret parameter equal to its path, its weekday or another field must
    not rewrite them, or the stored request (replayed, explained, shown) differs from the one decided."""
    query = "code=/v1/x&key=saturday&n=1"
    context = {"path": "/v1/x", "query": query, "local": {"weekday": "saturday"}, "body": {"p": "/v1/x"},
               "api_key": "saturday", "instance": "/v1/x", "n": "1"}
    shown = {**context, "query": f"code={REDACTED}&key={REDACTED}&n=1", "api_key": REDACTED}
    # The mapping says which fields came from the query: `api_key` from the secret `key`, `n` from `n`.
    assert REDACT.context(context, query, [("api_key", "key"), ("n", "n")]) == shown
    # Unknown sources: a field exactly equal to a secret is cut out; the mapping's own keys never are.
    assert REDACT.context(context, query) == {**shown, "instance": REDACTED}
