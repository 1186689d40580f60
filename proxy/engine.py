"""The Cedar decision engine: one live policy bundle, evaluated per call, swapped whole on reload.

`Engine.evaluate` takes a Cedar request (plain dicts) and returns an `Evaluation`. It reads the current
`Snapshot` once, so a decision never mixes two policy revisions. Each snapshot slices its policy set
by (action, resource type): a call is evaluated only against policies whose scope can match it, so
decision cost grows with the policies that apply, not with all of them. Slicing is exact because
Cedar checks the scope before any `when`/`unless` clause, so a policy whose scope cannot match can
neither be satisfied nor raise an error.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import cedarpy
from cedarpy import pst

from proxy.policy import (
    PolicyBundle,
    PolicyInfo,
    PolicyLoadError,
    directory_signature,
    load_bundle,
    policy_set_of,
)

log = logging.getLogger(__name__)

# Distinct (agent, host) pairs get their own small entity overlay; bound it so hostile traffic cannot
# grow memory without limit.
OVERLAY_CACHE_SIZE = 4096


@dataclass(frozen=True)
class CedarRequest:
    principal: tuple[str, str]
    action: tuple[str, str]
    resource: tuple[str, str]
    context: dict

    def as_cedarpy(self) -> dict:
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


class Snapshot:
    """A loaded bundle plus its per-call caches; never mutated in a way a reader could observe."""

    def __init__(self, bundle: PolicyBundle) -> None:
        self.bundle = bundle
        self._slices: dict[tuple[tuple[str, str], str], cedarpy.PolicySet] = {}
        self._overlays: OrderedDict[tuple, cedarpy.Entities] = OrderedDict()
        self._lock = threading.Lock()

    def policies_for(self, action: tuple[str, str], resource_type: str) -> cedarpy.PolicySet:
        key = (action, resource_type)
        sliced = self._slices.get(key)
        if sliced is None:
            chosen = [t for t in self.bundle.templates.values() if _scope_may_match(t, action, resource_type)]
            sliced = self.bundle.policy_set if len(chosen) == len(self.bundle.templates) else policy_set_of(chosen)
            self._slices[key] = sliced
        return sliced

    def entities_for(self, principal: tuple[str, str], resource: tuple[str, str]) -> cedarpy.Entities:
        """The entity set with the principal and resource present, adding bare ones when unlisted.

        An agent or host missing from entities.json still gets an entity (no parents, no tags), so
        `resource.tags.contains(...)` is false for it rather than an error that would deny everything.
        """
        missing = [uid for uid in (principal, resource) if uid not in self.bundle.entity_uids]
        if not missing:
            return self.bundle.entities
        key = tuple(missing)
        with self._lock:
            cached = self._overlays.get(key)
            if cached is not None:
                self._overlays.move_to_end(key)
                return cached
        delta = json.dumps([_bare_entity(uid) for uid in missing])
        overlay = self.bundle.entities.with_added_json_str(delta)
        with self._lock:
            self._overlays[key] = overlay
            if len(self._overlays) > OVERLAY_CACHE_SIZE:
                self._overlays.popitem(last=False)
        return overlay


def _bare_entity(uid: tuple[str, str]) -> dict:
    attrs = {"tags": []} if uid[0] == "Host" else {}
    return {"uid": {"type": uid[0], "id": uid[1]}, "attrs": attrs, "parents": []}


def _scope_may_match(template: pst.Template, action: tuple[str, str], resource_type: str) -> bool:
    """Conservative: False only when the scope provably excludes this action and resource type."""
    constraint = template.action
    if isinstance(constraint, pst.ActionEq):
        if _uid(constraint.entity) != action:
            return False
    # `action in [...]` may name action groups whose members only the schema knows; keep it.
    resource = template.resource
    if isinstance(resource, (pst.ScopeIs, pst.ScopeIsIn)):
        return str(resource.entity_type) == resource_type
    if isinstance(resource, pst.ScopeEq) and isinstance(resource.entity, pst.EntityUid):
        return str(resource.entity.type) == resource_type
    return True


def _uid(uid: pst.EntityUid) -> tuple[str, str]:
    return (str(uid.type), uid.id)


@dataclass
class ReloadStatus:
    revision: str | None = None
    loaded_at: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None


class Engine:
    """Owns the live snapshot of one policy directory and reloads it when its files change."""

    def __init__(self, policy_dir: str | Path) -> None:
        self.policy_dir = Path(policy_dir)
        self.status = ReloadStatus()
        self._signature = directory_signature(self.policy_dir) if self.policy_dir.is_dir() else ()
        self._snapshot = Snapshot(load_bundle(self.policy_dir))  # a bad set at start refuses to start
        self._mark_loaded()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def evaluate(self, request: CedarRequest) -> Evaluation:
        snap = self._snapshot  # read once: the whole decision uses this revision
        policies = snap.policies_for(request.action, request.resource[0])
        entities = snap.entities_for(request.principal, request.resource)
        result = cedarpy.is_authorized(request.as_cedarpy(), policies, entities)
        determining = tuple(result.diagnostics.reasons)
        known = snap.bundle.policies
        return Evaluation(
            decision=result.decision.value,
            determining=determining,
            errors=tuple(result.diagnostics.errors),
            revision=snap.bundle.revision,
            policies=tuple(known[p] for p in determining if p in known),
        )

    def reload(self) -> bool:
        """Load the directory again; on error keep the current set and report. True if swapped."""
        try:
            self._signature = directory_signature(self.policy_dir)
            bundle = load_bundle(self.policy_dir)
        except (PolicyLoadError, OSError) as exc:
            self.status.last_error = str(exc)
            self.status.last_error_at = datetime.now(UTC)
            log.error("policy reload failed, keeping revision %s: %s", self.status.revision, exc)
            return False
        self._snapshot = Snapshot(bundle)
        self._mark_loaded()
        log.info("policies reloaded: revision %s (%d policies)", bundle.revision[:12], len(bundle.policies))
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
