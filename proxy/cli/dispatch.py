"""How the proxy's master calls its addons' hooks: a table per event, built once, instead of a search per event.

mitmproxy's `AddonManager.trigger_event` looks for the hook on every addon (and every addon nested in
one) each time an event fires, through a context manager, a coroutine and two generators per addon,
whether or not the addon has that hook: measured, an event none of the lean master's 14 addons handle
(the `update` that follows every flow hook) cost about 45 us, and a call fires eight such events on a
kept-alive connection. `HookTable` finds each event's hooks once, the way mitmproxy finds them, and
then calls only those, in the same order, an error in a top-level addon's hooks handled by mitmproxy's
own `safecall` (an addon's error is logged and the next addon still runs; `AddonHalt` stops the event).
The tables are dropped whenever an addon is added, registered or removed; the addons of `cedargate run` never change
their hooks once loaded, which is what makes a table valid until then.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, safecall

# A top-level addon and its hooks for one event (it and its nested addons, in mitmproxy's order), or
# None where finding them failed: that addon is then asked mitmproxy's way each time, which logs why.
_Row = tuple[Any, "list[Callable[..., Any]] | None"]


_UPDATE = hooks.UpdateHook([])  # what the `update` table is looked up and built with


class HookTable(AddonManager):
    def __init__(self, master: Any) -> None:
        super().__init__(master)  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
        self._tables: dict[str, list[_Row]] = {}

    def register(self, addon: Any) -> Any:
        self._tables.clear()
        try:
            return super().register(addon)  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
        finally:
            self._tables.clear()

    def add(self, *addons: Any) -> None:
        self._tables.clear()
        try:
            super().add(*addons)  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
        finally:
            self._tables.clear()

    def remove(self, addon: Any) -> None:
        self._tables.clear()
        try:
            super().remove(addon)  # type: ignore[no-untyped-call]  # mitmproxy: unannotated
        finally:
            self._tables.clear()

    def clear(self) -> None:
        self._tables.clear()
        super().clear()  # type: ignore[no-untyped-call]  # mitmproxy: unannotated

    def _table(self, event: hooks.Hook) -> list[_Row]:
        table = self._tables.get(event.name)
        if table is None:
            table = []
            for addon in self.chain:
                try:
                    funcs: list[Callable[..., Any]] | None = [func for _, func in self._iter_hooks(addon, event)]
                except Exception:
                    funcs = None
                if funcs != []:
                    table.append((addon, funcs))
            self._tables[event.name] = table
        return table

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        # mitmproxy follows every flow hook with an `update` of the flow; none is made where no addon has one.
        if self._table(_UPDATE) and isinstance(message := event.args()[0], flow.Flow):
            await self.trigger_event(hooks.UpdateHook([message]))

    async def trigger_event(self, event: hooks.Hook) -> None:
        table = self._table(event)
        if not table:
            return
        args = event.args()
        for addon, funcs in table:
            try:
                if funcs is None:
                    with safecall():
                        await self.invoke_addon(addon, event)
                    continue
                for func in funcs:
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return
            except Exception:
                # mitmproxy's safecall, entered only on an error (it logs it, or raises OptionsError on): around
                # every hook it cost a generator and two calls per addon and event, some 14 per call.
                with safecall():
                    raise
