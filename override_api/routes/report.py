"""`GET /report`: `cedargate report` over the API, for the review page's report (`/inbox/report`).

Only approvers holding the auditor role (`auditor_role`) may read it: it names every reviewer's approval
rate and every policy's requests, which a reviewer of one team has no need to see. Anyone else is
refused with 403, whether signed in with a token or through the page's session (a GET: no CSRF token).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from override_api.deps import CurrentApprover, RuntimeDep
from proxy.cedar.escalation import parse_duration
from proxy.oversight.report import DEFAULT_MIN_REQUESTS, build_report, parse_threshold
from proxy.record.store import utcnow

router = APIRouter(prefix="/report", tags=["report"])


@router.get("", summary="Escalation, approval and change rates, review latency and expiries per policy and "
                        "reviewer; rubber-stamp candidates with a narrowed forbid each (auditors only)")
def report(
    runtime: RuntimeDep, approver: CurrentApprover,
    since: Annotated[str, Query(description="the window back from now: 30m, 12h, 7d")] = "7d",
    threshold: Annotated[str, Query(description="a share, 99% or 0.99")] = "99%",
    min_requests: Annotated[int, Query(ge=1, description="decided requests (votes) before a policy (reviewer) "
                                                         "is judged")] = DEFAULT_MIN_REQUESTS,
) -> dict[str, Any]:
    if not runtime.sees_all_overrides(approver.roles):
        raise HTTPException(403, detail=f"the report is for approvers holding the auditor role "
                                        f"({runtime.settings.auditor_role}); {approver.id} does not")
    try:
        window = parse_duration(since)
    except ValueError as exc:
        raise HTTPException(422, detail=f"since {since!r}: {exc} (e.g. 30m, 12h, 7d)") from None
    try:
        share = parse_threshold(threshold)
    except ValueError as exc:
        raise HTTPException(422, detail=str(exc)) from None
    until = utcnow()
    made = build_report(runtime.overrides.engine, until - timedelta(seconds=window), until, threshold=share,
                        min_requests=min_requests, bundle=runtime.engine.snapshot.bundle,
                        approver_roles={name: frozenset(a.roles) for name, a in runtime.settings.approvers.items()})
    return made.as_dict()
