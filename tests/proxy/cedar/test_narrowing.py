"""The narrowed forbid: the policy's own text with an `unless` clause for the approved combinations, which
parses and validates against the schema whatever the ids hold, and exempts exactly what it says."""

from __future__ import annotations

from pathlib import Path

import cedarpy
import pytest

from proxy.cedar.narrowing import MAX_COMBINATIONS, NarrowingError, entity, exempts, narrowed_forbid
from proxy.cedar.policy import load_bundle

STOP = ("Action", "post")


@pytest.fixture
def bundle(policy_dir: Path):
    return load_bundle(policy_dir)


def combination(agent: str, host: str) -> tuple:
    return ("Agent", agent), STOP, ("Host", host)


def test_a_few_combinations_are_listed_exactly_and_only_they_are_exempt(bundle):
    approved = [combination("ops-bot", "127.0.0.1"), combination("ops-bot", "10.0.0.7")]
    narrowed = narrowed_forbid(bundle, "protect-production-instances", approved, note="two approved")
    assert narrowed.exact and narrowed.text.startswith("// two approved\n@id(\"protect-production-instances\")")
    assert cedarpy.validate_policies(narrowed.text, bundle.schema).validation_passed
    assert exempts(narrowed, [*approved, combination("ops-bot", "10.0.0.8"), combination("other", "127.0.0.1")]) \
        == [True, True, False, False]


def test_many_combinations_become_sets_and_a_dimension_with_too_many_values_is_left_open(bundle):
    approved = [combination(f"agent-{n}", f"10.0.0.{n}") for n in range(MAX_COMBINATIONS + 1)]
    narrowed = narrowed_forbid(bundle, "protect-production-instances", approved)
    assert not narrowed.exact and narrowed.unconstrained == ()
    assert exempts(narrowed, [combination("agent-0", "10.0.0.1")]) == [True]  # a mix the sets admit
    crowd = [combination("ops-bot", f"10.0.{n}.1") for n in range(40)]
    wide = narrowed_forbid(bundle, "protect-production-instances", crowd)
    assert wide.unconstrained == ("resource",)
    assert exempts(wide, [combination("ops-bot", "192.168.1.1"), combination("x", "10.0.0.1")]) == [True, False]
    for text in (narrowed.text, wide.text):
        assert cedarpy.validate_policies(text, bundle.schema).validation_passed


def test_odd_ids_are_escaped_so_the_text_parses_and_shows_them(bundle):
    odd = combination('ops"bot\\', "evil\u202ehost\n")
    narrowed = narrowed_forbid(bundle, "protect-production-instances", [odd])
    assert '\\u{202e}' in narrowed.text and "\u202e" not in narrowed.text and "\\n" in narrowed.text
    assert cedarpy.validate_policies(narrowed.text, bundle.schema).validation_passed
    assert exempts(narrowed, [odd]) == [True]


def test_entity_literals_are_read_as_stored():
    assert entity('Host::"127.0.0.1"') == ("Host", "127.0.0.1")
    assert entity('Action::"tools/call"') == ("Action", "tools/call")
    with pytest.raises(NarrowingError, match="not a Cedar entity literal"):
        entity("127.0.0.1")


@pytest.mark.parametrize("policy, message", [
    ("ops-read", "is a permit, not a forbid"),
    ("no-such-policy", "is not in"),
])
def test_only_a_forbid_that_exists_is_narrowed(bundle, policy: str, message: str):
    with pytest.raises(NarrowingError, match=message):
        narrowed_forbid(bundle, policy, [combination("ops-bot", "127.0.0.1")])
