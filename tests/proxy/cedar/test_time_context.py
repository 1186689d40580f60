"""Policies that read the time: `context.time` and `context.local`, decided on an injected clock, and the
decision cache keeping each decision exactly as long as the time its policies read stays the same."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import cedarpy
import pytest
from proxy_support import POLICIES, make_call

from proxy.calls.mapping import MappingOptions
from proxy.cedar import engine as engine_module
from proxy.cedar.context import time_context
from proxy.cedar.engine import Engine
from proxy.decision.gate import Gate, Outcome
from proxy.settings.config import ConfigError, load_settings

BERLIN = ZoneInfo("Europe/Berlin")


class Clock:
    """A clock a test sets: what the gate reads as "now"."""

    def __init__(self, at: str) -> None:
        self.now = datetime.fromisoformat(at)

    def __call__(self) -> datetime:
        return self.now

    def set(self, at: str) -> None:
        self.now = datetime.fromisoformat(at)


@pytest.fixture
def cedar_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every request the engine hands Cedar (the decision cache's misses)."""
    seen: list[dict] = []
    real = cedarpy.is_authorized

    def counted(request, policies, entities):
        seen.append(request)
        return real(request, policies, entities)

    monkeypatch.setattr(engine_module.cedarpy, "is_authorized", counted)
    return seen


def policy_dir(tmp_path: Path, cedar: str) -> Path:
    target = tmp_path / "policies"
    target.mkdir()
    for name in ("schema.cedarschema", "entities.json"):
        shutil.copy(POLICIES / name, target / name)
    (target / "p.cedar").write_text(cedar)
    return target


AFTER_HOURS = """
@id("ops-stop")
permit (principal in Team::"ops", action == Action::"post", resource);

@id("after-hours")
@escalate("on-call")
forbid (principal, action == Action::"post", resource)
when { context.local.hour < 8 || context.local.hour >= 18 };
"""


def gate_on(directory: Path, clock: Clock, zone: ZoneInfo = BERLIN) -> Gate:
    return Gate(Engine(directory), None, MappingOptions(time_zone=zone), clock=clock)


def stop() -> object:
    return make_call("POST", "https://cloud.staging.example/v1/instances/i-1/stop")


# -- the context ------------------------------------------------------------------------------------------

def test_the_time_is_utc_to_the_second_and_local_is_the_configured_wall_clock():
    at = datetime(2026, 3, 29, 0, 30, 15, 999_999, UTC)  # the night Berlin moves to summer time
    assert time_context(at, BERLIN) == {
        "time": {"__extn": {"fn": "datetime", "arg": "2026-03-29T00:30:15Z"}},
        "local": {"hour": 1, "minute": 30, "weekday": "sunday", "date": "2026-03-29"},
    }
    assert time_context(at + timedelta(hours=1), BERLIN)["local"]["hour"] == 3  # 02:30 never happens there
    new_york = time_context(at, ZoneInfo("America/New_York"))["local"]
    assert new_york == {"hour": 20, "minute": 30, "weekday": "saturday", "date": "2026-03-28"}


def test_a_policy_compares_context_time_as_a_cedar_datetime(tmp_path):
    clock = Clock("2026-12-24T11:59:59+00:00")
    gate = gate_on(policy_dir(tmp_path, """
@id("ops-stop")
permit (principal in Team::"ops", action == Action::"post", resource)
when { context.time < datetime("2026-12-24T12:00:00Z") };
"""), clock)
    assert gate.decide(stop()).outcome is Outcome.ALLOW
    clock.set("2026-12-24T12:00:00+00:00")
    assert gate.decide(stop()).outcome is Outcome.DENY


def test_the_verdict_is_recorded_at_the_clock_s_time():
    clock = Clock("2026-12-02T20:00:00+00:00")
    gate = Gate(Engine(POLICIES), None, clock=clock)
    verdict = gate.decide(make_call("GET", "http://localhost:9000/v1/instances"))
    assert verdict.at == clock.now and verdict.request is not None
    assert verdict.request.context["time"]["__extn"]["arg"] == "2026-12-02T20:00:00Z"
    assert verdict.request.context["local"]["hour"] == 20  # the default zone is UTC


# -- the decision cache -----------------------------------------------------------------------------------

def test_a_decision_on_the_hour_is_made_again_when_the_hour_changes_and_not_before(tmp_path, cedar_calls):
    clock = Clock("2026-12-02T17:58:00+01:00")
    gate = gate_on(policy_dir(tmp_path, AFTER_HOURS), clock)
    assert gate.decide(stop()).outcome is Outcome.ALLOW
    clock.set("2026-12-02T17:59:59+01:00")  # another minute and second, the same hour: cached
    assert gate.decide(stop()).outcome is Outcome.ALLOW
    assert len(cedar_calls) == 1
    assert cedar_calls[0]["context"]["local"] == {"hour": 17}  # Cedar is given only what is read
    clock.set("2026-12-02T18:00:00+01:00")
    assert gate.decide(stop()).outcome is Outcome.ESCALATE
    assert len(cedar_calls) == 3  # the hour changed: decided again (and once more with the forbid lifted)
    clock.set("2026-12-02T18:30:00+01:00")
    assert gate.decide(stop()).outcome is Outcome.ESCALATE
    assert len(cedar_calls) == 3


def test_with_no_policy_on_the_time_a_decision_stays_cached_across_hours_and_days(tmp_path, cedar_calls):
    clock = Clock("2026-12-02T10:00:00+00:00")
    gate = gate_on(policy_dir(tmp_path, 'permit (principal in Team::"ops", action, resource);'.replace(
        "permit", '@id("ops")\npermit', 1)), clock)
    for at in ("2026-12-02T10:00:00+00:00", "2026-12-02T23:59:59+00:00", "2026-12-07T03:00:00+00:00"):
        clock.set(at)
        assert gate.decide(stop()).outcome is Outcome.ALLOW
    assert len(cedar_calls) == 1
    assert "time" not in cedar_calls[0]["context"] and "local" not in cedar_calls[0]["context"]


def test_a_policy_reading_the_weekday_is_cached_for_the_day(tmp_path, cedar_calls):
    clock = Clock("2026-12-04T08:00:00+01:00")  # a Friday
    gate = gate_on(policy_dir(tmp_path, """
@id("weekdays")
permit (principal in Team::"ops", action, resource)
when { !["saturday", "sunday"].contains(context.local.weekday) };
"""), clock)
    assert gate.decide(stop()).outcome is Outcome.ALLOW
    clock.set("2026-12-04T23:59:00+01:00")
    assert gate.decide(stop()).outcome is Outcome.ALLOW
    clock.set("2026-12-05T00:00:00+01:00")  # Saturday in Berlin (still Friday in UTC)
    assert gate.decide(stop()).outcome is Outcome.DENY
    assert [c["context"]["local"] for c in cedar_calls] == [{"weekday": "friday"}, {"weekday": "saturday"}]


def test_a_policy_on_context_time_is_cached_for_its_second(tmp_path, cedar_calls):
    clock = Clock("2026-12-24T11:59:58.100+00:00")
    gate = gate_on(policy_dir(tmp_path, """
@id("before-noon")
permit (principal in Team::"ops", action, resource)
when { context.time < datetime("2026-12-24T12:00:00Z") };
"""), clock)
    for at in ("2026-12-24T11:59:58.100+00:00", "2026-12-24T11:59:58.900+00:00", "2026-12-24T11:59:59+00:00"):
        clock.set(at)
        assert gate.decide(stop()).outcome is Outcome.ALLOW
    assert len(cedar_calls) == 2  # 11:59:58 (twice) and 11:59:59
    assert "local" not in cedar_calls[0]["context"]


def test_a_policy_reading_local_as_a_whole_gets_every_field(tmp_path, cedar_calls):
    clock = Clock("2026-12-04T08:00:00+00:00")
    gate = gate_on(policy_dir(tmp_path, """
@id("whole")
permit (principal in Team::"ops", action, resource)
when { context.local == {"hour": 8, "minute": 0, "weekday": "friday", "date": "2026-12-04"} };
"""), clock, UTC)  # type: ignore[arg-type]
    assert gate.decide(stop()).outcome is Outcome.ALLOW
    clock.set("2026-12-04T08:01:00+00:00")
    assert gate.decide(stop()).outcome is Outcome.DENY
    assert len(cedar_calls) == 2


# -- the bundled example ----------------------------------------------------------------------------------

def test_the_bundled_config_names_berlin_and_a_bad_zone_is_refused_with_what_to_give(tmp_path):
    assert load_settings(Path(__file__).resolve().parents[3] / "cedargate.yaml").time_zone == "Europe/Berlin"
    assert load_settings(None).time_zone == "UTC"
    for bad in ("Mars/Olympus_Mons", "../etc/passwd", "Europe", ""):
        config = tmp_path / "c.yaml"
        config.write_text(f"time_zone: {bad!r}\n")
        with pytest.raises(ConfigError, match="time_zone: .*not a time zone this machine knows; give an IANA"):
            load_settings(config)
