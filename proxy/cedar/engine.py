"""The Cedar decision engine: one live policy bundle, evaluated per call, swapped whole on reload.

`Engine.evaluate` takes a Cedar request (plain dicts) and returns an `Evaluation`. It reads the current
`Snapshot` once, so a decision never mixes two policy revisions. Each snapshot indexes its policies by
scope: a call is evaluated only against the policies whose `principal`, `action` and `resource` scope
can hold for it (using the entity hierarchy, as Cedar's `in` does), so decision cost grows with the
policies that apply, not with all of them. Slicing is exact because Cedar checks the scope before any
`when`/`unless` clause: a policy whose scope does not hold can neither be satisfied nor raise an error.
Within the scope, the condition index (`proxy.cedar.conditions`) drops the policies whose leading
`when` tests it can answer false for the call, exactly where Cedar would stop: equalities on context,
principal and resource attributes (`context.customer == "acme"`), `has`, `contains`, and
`context.path like "/literal/prefix*..."`; so many policies on one action that differ only in their
conditions cost what the few that can apply cost. Each slice also knows which context attributes its
policies read; Cedar is handed only those (turning the context into Cedar values is most of cedarpy's
cost per call), or all of it when a policy uses `context` as a whole; of `context.local` (the wall
clock) only the fields they read. A Cedar decision is a pure function of the request and the snapshot's
policies and entities (Cedar has no clock or randomness: the time of the call is in its context), so
each snapshot keeps a bounded cache of decisions keyed by the exact request handed to Cedar and the
request's condition signature (calls whose contexts differ only where the index looked get different
slices, yet may hand Cedar the same context); a reload starts a new snapshot and so an empty cache.
Because Cedar gets only what the slice reads, the time is in the key only as finely as its policies
read it: not at all when none reads `context.time` or `context.local`, the hour when one reads
`context.local.hour`, so such a decision is made again when the hour changes, and no sooner.

An advisory attribute (`proxy.cedar.context.ADVISORY`: an MCP server's tool hints) comes from a source
cedargate does not trust. A request carrying one is evaluated with it and without it, and the stricter
answer stands (`stricter`): allowed only if both allow, with the determining policies and errors of
both. So such a source can add caution (a forbid on `context.hints.destructiveHint`), never take it away
(a permit on `context.hints.readOnlyHint` lets nothing through that policy without it would not).

An override lifts the escalatable forbids (`@escalate`) and nothing else, so a denial is grantable only
if the call would be allowed without them. `evaluate(..., lifted=True)` answers that against the same
snapshot: the same scope index and slices with the escalatable forbids left out, cached apart from the
full set's (in the slice cache and the decision cache alike), so either answer stays exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cedarpy
from cedarpy import pst

from proxy.cedar.conditions import ConditionIndex, Scope
from proxy.cedar.context import ADVISORY, TIME_RECORD
from proxy.cedar.entities import bare_entity, implicit_parents
from proxy.cedar.escalation import is_escalatable
from proxy.cedar.policy import (
    PolicyBundle,
    PolicyInfo,
    PolicyLoadError,
    directory_signature,
    load_bundle,
    policy_set_of,
    record_fields,
    syntax_children,
)
from proxy.observe.metrics import LIVE_POLICIES, PolicyReports
from proxy.vocabulary.canonical import canonical

log = logging.getLogger(__name__)

# Distinct (agent, host) pairs get their own small entity overlay; bound it so hostile traffic cannot
# grow memory without limit.
OVERLAY_CACHE_SIZE = 4096


@dataclass(frozen=True)
class CedarRequest:
    principal: tuple[str, str]
    action: tuple[str, str]
    resource: tuple[str, str]
    context: dict[str, Any]
    # (context key, query parameter) of each manifest field the mapping took from the query: what a
    # redaction of the query's secrets must also cut out of the context (`Redaction.context`), and nothing else.
    query_fields: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def as_cedarpy(self) -> dict[str, Any]:
        return {
            "principal": {"type": self.principal[0], "id": self.principal[1]},
            "action": {"type": self.action[0], "id": self.action[1]},
            "resource": {"type": self.resource[0], "id": self.resource[1]},
            "context": self.context,
        }


@dataclass(frozen=True)
class Evaluation:
    decision: str  # "Allow", "Deny" or "NoDecision", as Cedar says it
    determining: tuple[str, ...]
    errors: tuple[str, ...]
    revision: str
    # The determining policies' details from the same snapshot, so no second read can mix revisions.
    policies: tuple[PolicyInfo, ...] = ()

    @property
    def allowed(self) -> bool:
        # Cedar skips a forbid whose condition errors, so an Allow with errors may hide a forbid.
        return self.decision == "Allow" and not self.errors


def stricter(told: Evaluation, untold: Evaluation) -> Evaluation:
    """One answer from an evaluation with advisory attributes (`told`) and one without (`untold`):
    allowed only if both are (then `untold`, since its permits allow the call on trusted facts alone);
    otherwise a denial with both sides' determining policies and errors.

    The union keeps what the gate needs exact: a denial whose forbids are all escalatable is grantable
    only if the same request with them lifted is allowed, again by both evaluations.
    """
    if told.allowed and untold.allowed:
        return untold  # allowed by the policies that hold without the advisory attributes: those are why
    if told.allowed != untold.allowed and not (told.errors or untold.errors):
        return untold if told.allowed else told
    denied = [e for e in (told, untold) if not e.allowed]
    determining = tuple(dict.fromkeys(p for e in denied for p in e.determining))
    policies = {p.policy_id: p for e in denied for p in e.policies}
    return Evaluation(
        decision="Deny" if any(e.decision == "Deny" for e in (told, untold)) else told.decision,
        determining=determining,
        errors=tuple(dict.fromkeys((*told.errors, *untold.errors))),
        revision=told.revision,
        policies=tuple(policies[p] for p in determining if p in policies),
    )


Uid = tuple[str, str]

# Calls with a new (agent, action, host) cost one index lookup; bound the caches against hostile traffic.
SCOPE_CACHE_SIZE = 8192
SLICE_CACHE_SIZE = 8192
POLICY_SET_CACHE_SIZE = 1024
DECISION_CACHE_SIZE = 4096


class ScopeIndex:
    """Which policies' scopes can hold for a (principal, action, resource), answered from the entity graph."""

    def __init__(self, bundle: PolicyBundle, entities: Iterable[Mapping[str, Any]]) -> None:
        # `entities`: the entity set as Cedar holds it, with the schema's action entities and their groups.
        self._parents: dict[Uid, tuple[Uid, ...]] = {
            (e["uid"]["type"], e["uid"]["id"]): tuple((p["type"], p["id"]) for p in e.get("parents", ()))
            for e in entities
        }
        self._ancestry: dict[Uid, frozenset[Uid]] = {}
        self._by_action: dict[Uid, list[pst.Template]] = {}
        self._any_action: list[pst.Template] = []
        for template in bundle.templates.values():
            if isinstance(template.action, pst.ActionEq):
                self._by_action.setdefault(_uid(template.action.entity), []).append(template)
            else:
                self._any_action.append(template)

    def ancestry(self, uid: Uid) -> frozenset[Uid]:
        """The entity and everything it is `in`, transitively (an unlisted entity: its implicit parents)."""
        known = self._ancestry.get(uid)
        if known is None:
            listed = uid in self._parents
            seen, stack = {uid}, list(self._parents[uid] if listed else implicit_parents(uid))
            while stack:
                parent = stack.pop()
                if parent not in seen:
                    seen.add(parent)
                    stack.extend(self._parents.get(parent, ()))
            known = frozenset(seen)
            if listed:  # unlisted ids come from agents: caching them would let traffic grow memory
                self._ancestry[uid] = known
        return known

    def applicable(self, principal: Uid, action: Uid, resource: Uid) -> tuple[str, ...]:
        """The policies whose scope holds for the call, in id order."""
        principals, actions, resources = self.ancestry(principal), self.ancestry(action), self.ancestry(resource)
        return tuple(sorted(
            t.id for t in (*self._by_action.get(action, ()), *self._any_action)
            if _action_holds(t.action, actions)
            and _scope_holds(t.principal, principal, principals)
            and _scope_holds(t.resource, resource, resources)
        ))


def _uid(uid: pst.EntityUid | pst.Slot) -> Uid:
    assert isinstance(uid, pst.EntityUid)  # policies, not templates: no scope is a `?principal` slot
    return (str(uid.type), uid.id)


def _scope_holds(constraint: object, uid: Uid, ancestry: frozenset[Uid]) -> bool:
    if isinstance(constraint, pst.ScopeEq):
        return _uid(constraint.entity) == uid
    if isinstance(constraint, pst.ScopeIn):
        return _uid(constraint.entity) in ancestry
    if isinstance(constraint, pst.ScopeIs):
        return str(constraint.entity_type) == uid[0]
    if isinstance(constraint, pst.ScopeIsIn):
        return str(constraint.entity_type) == uid[0] and _uid(constraint.entity) in ancestry
    return True  # ScopeAny, or a form this index does not know: keep the policy


def _action_holds(constraint: object, ancestry: frozenset[Uid]) -> bool:
    if isinstance(constraint, pst.ActionEq):
        return _uid(constraint.entity) in ancestry
    if isinstance(constraint, pst.ActionIn):
        return any(_uid(e) in ancestry for e in constraint.entities)
    return True


class _Lru(OrderedDict[Any, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)


@dataclass(frozen=True)
class Slice:
    ids: tuple[str, ...]
    policy_set: cedarpy.PolicySet
    context_attributes: frozenset[str] | None  # None: some policy reads `context` whole
    clock_fields: frozenset[str] | None = None  # of `context.local`; None: read whole (or as a record)

    def context_of(self, context: dict[str, Any]) -> dict[str, Any]:
        if self.context_attributes is None:
            return context
        kept = {k: v for k, v in context.items() if k in self.context_attributes}
        local = kept.get(TIME_RECORD)
        if self.clock_fields is not None and isinstance(local, dict):
            # Only the wall-clock fields read, so a cached decision on the hour lasts the hour.
            kept[TIME_RECORD] = {k: v for k, v in local.items() if k in self.clock_fields}
        return kept


def _context_attributes(templates: Iterable[pst.Template]) -> frozenset[str] | None:
    """The top-level context attributes these policies read, or None if any uses `context` itself."""
    found: set[str] = set()
    stack: list[Any] = [clause.expr for t in templates for clause in t.clauses]
    while stack:
        node = stack.pop()
        if isinstance(node, (pst.GetAttr, pst.HasAttr)) and isinstance(node.base, pst.Var):
            if node.base.name == "context":
                found.add(node.attr if isinstance(node, pst.GetAttr) else node.attrs[0])
            continue
        if isinstance(node, pst.Var) and node.name == "context":
            return None
        stack.extend(syntax_children(node))
    return frozenset(found)


class Snapshot:
    """A loaded bundle plus its per-call caches; never mutated in a way a reader could observe."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self.bundle = bundle
        listed = json.loads(str(bundle.entities))
        self.index = ScopeIndex(bundle, listed)
        # Attributes as Cedar holds them (the schema applied), for the condition index's entity tests.
        self._attributes: dict[Uid, Mapping[str, Any]] = {
            (e["uid"]["type"], e["uid"]["id"]): e.get("attrs", {}) for e in listed}
        self.conditions = ConditionIndex(bundle.templates.values(), self.attributes_of)
        # What an override may lift: left out of every slice evaluated with `lifted`.
        self.escalatable = frozenset(i for i, p in bundle.policies.items() if is_escalatable(p))
        self._scopes: _Lru = _Lru(SCOPE_CACHE_SIZE)  # (principal, action, resource) -> Scope
        self._plans: _Lru = _Lru(POLICY_SET_CACHE_SIZE)  # policy ids -> Scope, shared across calls
        self._slices: _Lru = _Lru(SLICE_CACHE_SIZE)  # (lifted, principal, action, resource, signature) -> Slice
        self._sets: _Lru = _Lru(POLICY_SET_CACHE_SIZE)  # policy ids -> PolicySet, shared across calls
        self._overlays: _Lru = _Lru(OVERLAY_CACHE_SIZE)
        self.decisions: _Lru = _Lru(DECISION_CACHE_SIZE)  # exact Cedar request -> Evaluation
        self._lock = threading.Lock()

    def attributes_of(self, uid: Uid) -> Mapping[str, Any]:
        """The entity's attributes as `entities_for` gives it to Cedar."""
        return self._attributes[uid] if uid in self.bundle.entity_uids else bare_entity(uid)["attrs"]

    def policies_for(self, principal: Uid, action: Uid, resource: Uid, path: str = "/", *,
                     lifted: bool = False, context: Mapping[str, Any] | None = None) -> cedarpy.PolicySet:
        return self.slice_for(principal, action, resource, self.conditions.signature(context, path),
                              lifted=lifted).policy_set

    def slice_for(self, principal: Uid, action: Uid, resource: Uid, signature: tuple[Any, ...], *,
                  lifted: bool = False) -> Slice:
        """The policies that can apply to a call with this condition signature (`conditions.signature`);
        with `lifted`, without the escalatable forbids."""
        key = (lifted, principal, action, resource, signature)
        sliced: Slice | None = self._slices.get(key)
        if sliced is not None:
            return sliced
        ids = self.conditions.admits(self.scope_of(principal, action, resource), principal, resource, signature)
        if lifted:
            ids = tuple(i for i in ids if i not in self.escalatable)
        sliced = self._sets.get(ids)  # keyed by the ids themselves, so both sets share it exactly
        if sliced is None:
            templates = self.bundle.templates
            chosen = [templates[i] for i in ids]
            policy_set = self.bundle.policy_set if len(ids) == len(templates) else policy_set_of(chosen)
            sliced = Slice(ids, policy_set, _context_attributes(chosen), record_fields(chosen, TIME_RECORD))
        with self._lock:
            self._sets.put(ids, sliced)
            self._slices.put(key, sliced)
        return sliced

    def scope_of(self, principal: Uid, action: Uid, resource: Uid) -> Scope:
        """The policies whose scope holds for the call (cached: many signatures share one scope)."""
        key = (principal, action, resource)
        scope: Scope | None = self._scopes.get(key)
        if scope is None:
            ids = self.index.applicable(principal, action, resource)
            # Many agents and hosts share one scope: share its plan too, so memory grows with the
            # distinct scopes, not with the (agent, action, host) triples traffic brings.
            scope = self._plans.get(ids) or self.conditions.plan(ids)
            with self._lock:
                self._plans.put(ids, scope)
                self._scopes.put(key, scope)
        return scope

    def could_allow(self, principal: Uid, action: Uid, resource: Uid, path: str = "/") -> bool:
        """Whether any call of `principal` doing `action` on `resource` at `path` could be allowed,
        whatever the rest of its context.

        False only when no permit's scope holds for it (or the condition index answers its conditions
        false from the entities and the path alone), or a forbid with no conditions and no `@escalate`
        does: then every such call is denied. Other conditions are taken as possibly true, so this never
        hides what some call could do. The indexes answer it exactly (Cedar checks scope first; the
        differential tests hold the indexes to Cedar), with no Cedar evaluation.
        """
        signature = self.conditions.signature(None, path)
        key = ("could_allow", principal, action, resource, signature)
        known: bool | None = self.decisions.get(key)
        if known is not None:
            return known
        permitted = always_forbidden = False
        for i in self.conditions.admits(self.scope_of(principal, action, resource), principal, resource, signature):
            template = self.bundle.templates[i]
            if template.effect == "permit":
                permitted = True
            elif not template.clauses and i not in self.escalatable:
                always_forbidden = True
        allowed = permitted and not always_forbidden
        with self._lock:
            self.decisions.put(key, allowed)
        return allowed

    def entities_for(self, principal: Uid, resource: Uid) -> cedarpy.Entities:
        """The entity set with the principal and resource present, adding bare ones when unlisted."""
        missing = tuple(uid for uid in (principal, resource) if uid not in self.bundle.entity_uids)
        if not missing:
            return self.bundle.entities
        overlay = self._overlays.get(missing)
        if overlay is None:
            overlay = self.bundle.entities.with_added_json_str(json.dumps([bare_entity(uid) for uid in missing]))
            with self._lock:
                self._overlays.put(missing, overlay)
        return overlay


@dataclass
class ReloadStatus:
    revision: str | None = None
    loaded_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None


class Engine:
    """Owns the live snapshot of one policy directory and reloads it when its files change.

    `reports` says how its loads and reloads are reported (the metrics, the log's wording): the live set's
    by default; the shadow set's engine reports under its own names, so it never reads as the live set."""

    def __init__(self, policy_dir: str | Path, *, reports: PolicyReports = LIVE_POLICIES) -> None:
        self.policy_dir = Path(policy_dir)
        self.reports = reports
        self.status = ReloadStatus()
        self._signature = directory_signature(self.policy_dir) if self.policy_dir.is_dir() else ()
        self._snapshot = Snapshot(load_bundle(self.policy_dir))  # a bad set at start refuses to start
        self._mark_loaded()
        reports.revision(self._snapshot.bundle.revision, None)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Called with each new set once it is live (whoever composes the program reports on it).
        self.on_reload: list[Callable[[PolicyBundle], None]] = []

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def evaluate(self, request: CedarRequest, snapshot: Snapshot | None = None, *,
                 lifted: bool = False) -> Evaluation:
        """Cedar's decision on the request; with `lifted`, as if every escalatable forbid were removed
        (what a human's grant could at most release). A request with advisory attributes is decided
        with and without them, the stricter answer standing (`stricter`)."""
        # Read once (or given by a caller that mapped with it): one decision, one revision.
        snap = snapshot or self._snapshot
        advised = ADVISORY.intersection(request.context)
        if not advised:
            return self._evaluate(request, snap, lifted)
        untold = dataclasses.replace(request, context={
            k: v for k, v in request.context.items() if k not in advised})
        # When no policy of the slice reads them, both hand Cedar the same request: one is a cache hit.
        return stricter(self._evaluate(request, snap, lifted), self._evaluate(untold, snap, lifted))

    def _evaluate(self, request: CedarRequest, snap: Snapshot, lifted: bool) -> Evaluation:
        signature = snap.conditions.signature(request.context)
        sliced = snap.slice_for(request.principal, request.action, request.resource, signature, lifted=lifted)
        entities = snap.entities_for(request.principal, request.resource)
        cedar_request = request.as_cedarpy()
        cedar_request["context"] = sliced.context_of(request.context)
        # `lifted` in the key: the same request may be denied by the full set and allowed by the other.
        # The signature too: the slice's context leaves out what only the policies it dropped read, so
        # two calls with different slices can hand Cedar the same context.
        key = (lifted, request.principal, request.action, request.resource, signature,
               canonical(cedar_request["context"]))
        cached: Evaluation | None = snap.decisions.get(key)  # the cache holds what is put below
        if cached is not None:
            return cached
        result = cedarpy.is_authorized(cedar_request, sliced.policy_set, entities)
        determining = tuple(result.diagnostics.reasons)
        known = snap.bundle.policies
        evaluation = Evaluation(
            decision=result.decision.value,
            determining=determining,
            errors=tuple(result.diagnostics.errors),
            revision=snap.bundle.revision,
            policies=tuple(known[p] for p in determining if p in known),
        )
        with snap._lock:
            snap.decisions.put(key, evaluation)
        return evaluation

    def reload(self) -> bool:
        """Load the directory again; on error keep the current set and report. True if swapped."""
        try:
            self._signature = directory_signature(self.policy_dir)
            bundle = load_bundle(self.policy_dir)
        except (PolicyLoadError, OSError) as exc:
            self.status.last_error = str(exc)
            self.status.last_error_at = datetime.now(UTC)
            log.error("%s reload failed, keeping revision %s: %s", self.reports.role, self.status.revision, exc)
            self.reports.reloaded(False)
            return False
        previous = self._snapshot.bundle.revision
        self._snapshot = Snapshot(bundle)
        self._mark_loaded()
        self.reports.reloaded(True)
        self.reports.revision(bundle.revision, previous)
        log.info("%s reloaded: revision %s (%d policies)", self.reports.role, bundle.revision[:12],
                 len(bundle.policies))
        for listener in self.on_reload:
            try:
                listener(bundle)
            except Exception:  # a report on the new set must not undo it
                log.exception("after the policy reload")
        return True

    def reload_if_changed(self) -> bool:
        try:
            signature = directory_signature(self.policy_dir)
        except OSError as exc:
            self.status.last_error = f"policy directory unreadable: {exc}"
            self.status.last_error_at = datetime.now(UTC)
            return False
        if signature == self._signature:
            return False
        return self.reload()

    def watch(self, interval: float) -> None:
        """Poll the directory in a daemon thread; polling works on every filesystem and platform."""
        if self._watcher or interval <= 0:
            return

        def loop() -> None:
            pending = None
            while not self._stop.wait(interval):
                try:
                    signature = directory_signature(self.policy_dir)
                    if signature == self._signature or signature != pending:
                        # Reload only once the files looked the same on two polls, so an editor's
                        # half-saved file that happens to validate is never live, even briefly.
                        pending = None if signature == self._signature else signature
                        continue
                    pending = None
                    self.reload()
                except OSError as exc:
                    self.status.last_error = f"policy directory unreadable: {exc}"
                    self.status.last_error_at = datetime.now(UTC)
                except Exception:  # the watcher must outlive any surprise; the old set stays live
                    log.exception("policy watcher failed")

        self._watcher = threading.Thread(target=loop, name="cedargate-policy-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        self._stop.set()

    def _mark_loaded(self) -> None:
        self.status.revision = self._snapshot.bundle.revision
        self.status.loaded_at = datetime.now(UTC)
        self.status.last_error = None
        self.status.last_error_at = None
