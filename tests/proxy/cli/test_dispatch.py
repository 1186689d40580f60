"""The proxy master's hook tables (`proxy.cli.dispatch`) call the hooks mitmproxy's own manager would, in
its order, with its handling of an addon's error and of `AddonHalt`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from mitmproxy import exceptions, hooks
from mitmproxy.addonmanager import AddonManager
from mitmproxy.master import Master
from mitmproxy.options import Options
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from proxy.cli.dispatch import HookTable


class Recorder:
    def __init__(self, name: str, calls: list[str], addons: list | None = None) -> None:
        self.name = name
        self.calls = calls
        if addons is not None:
            self.addons = addons

    def request(self, flow) -> None:
        self.calls.append(f"{self.name}.request")


class AsyncRecorder(Recorder):
    async def request(self, flow) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}.request")


class Failing(Recorder):
    def request(self, flow) -> None:
        raise ValueError("broken addon")


class Halting(Recorder):
    def request(self, flow) -> None:
        self.calls.append(f"{self.name}.request")
        raise exceptions.AddonHalt()


class Updating(Recorder):
    def update(self, flows) -> None:
        self.calls.append(f"{self.name}.update")


def _calls_with(manager: type[AddonManager], make_addons, event_of=HttpRequestHook,
                lifecycle: bool = False) -> list[str]:
    calls: list[str] = []

    async def run() -> None:
        with _master(manager) as master:
            master.addons.add(*make_addons(calls))
            event = event_of(tflow.tflow())
            if lifecycle:
                await master.addons.handle_lifecycle(event)
            else:
                await master.addons.trigger_event(event)

    asyncio.run(run())
    return calls


@contextmanager
def _master(manager: type[AddonManager]) -> Iterator[Master]:
    master = Master(Options())
    master.options.changed.disconnect(master.addons._configure_all)
    master.addons = manager(master)
    try:
        yield master
    finally:
        master._legacy_log_events.uninstall()  # its handler would log into this test's closed loop


def test_the_hooks_called_are_mitmproxys_in_its_order_nested_addons_included():
    def addons(calls):
        return [Recorder("a", calls), AsyncRecorder("b", calls, [Recorder("b1", calls), Updating("b2", calls)]),
                Updating("c", calls), Recorder("d", calls)]

    expected = ["a.request", "b.request", "b1.request", "b2.request", "c.request", "d.request"]
    assert _calls_with(AddonManager, addons) == expected
    assert _calls_with(HookTable, addons) == expected
    # Each flow hook is followed by an `update` of the flow, as mitmproxy does, when an addon has one.
    with_update = expected + ["b2.update", "c.update"]
    assert _calls_with(AddonManager, addons, lifecycle=True) == with_update
    assert _calls_with(HookTable, addons, lifecycle=True) == with_update
    # An event only some addons handle calls theirs; none handling it and no `update`, nothing.
    assert _calls_with(HookTable, addons, event_of=HttpResponseHook, lifecycle=True) == ["b2.update", "c.update"]
    assert _calls_with(HookTable, lambda calls: [Recorder("a", calls)], event_of=HttpResponseHook,
                       lifecycle=True) == []


def test_an_addons_error_is_logged_and_the_next_addon_still_runs_as_under_mitmproxy(caplog):
    def addons(calls):
        return [Failing("a", calls), Recorder("b", calls, [Failing("b1", calls), Recorder("b2", calls)]),
                Recorder("c", calls)]

    with caplog.at_level(logging.ERROR):
        # b's own hook ran; its failing nested addon ends the rest of b's hooks, never c's.
        assert _calls_with(HookTable, addons) == _calls_with(AddonManager, addons) == ["b.request", "c.request"]
    assert caplog.text.count("Addon error: broken addon") == 4


def test_addon_halt_stops_the_event():
    def addons(calls):
        return [Recorder("a", calls), Halting("b", calls), Recorder("c", calls)]

    assert _calls_with(HookTable, addons) == _calls_with(AddonManager, addons) == ["a.request", "b.request"]


def test_an_addon_added_later_gets_the_events_it_handles():
    calls: list[str] = []

    async def run() -> None:
        with _master(HookTable) as master:
            table = master.addons
            table.add(Recorder("a", calls))
            await table.handle_lifecycle(HttpRequestHook(tflow.tflow()))
            table.add(Updating("b", calls))
            await table.handle_lifecycle(HttpRequestHook(tflow.tflow()))
            table.remove(table.get("a"))
            await table.handle_lifecycle(HttpRequestHook(tflow.tflow()))
            await table.trigger_event(hooks.UpdateHook([]))

    asyncio.run(run())
    assert calls == ["a.request", "a.request", "b.request", "b.update", "b.request", "b.update", "b.update"]
