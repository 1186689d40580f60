"""Signing in to the review page: an approver's token exchanged for a session cookie, and signing out.

The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it) and Secure
when the API is reached over TLS. The answer carries the session's CSRF token, which the page sends
with every change (`X-CSRF-Token`, see `override_api.deps`). Failed sign-ins are throttled per client
address. Each sign-in and sign-out is chained on the audit log.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field

from override_api.deps import (
    SESSION_COOKIE,
    RuntimeDep,
    SessionCookie,
    SessionsDep,
    check_csrf,
    check_same_origin,
    session_of,
)
from proxy.oversight.reviewer_sessions import SignedIn
from proxy.record.audit import EventKind
from proxy.settings.agents import hash_token

router = APIRouter(prefix="/session", tags=["session"])


class SignIn(BaseModel):
    token: str = Field(min_length=1, max_length=1000, description="the approver's token, as for the bearer API")


class SessionPublic(BaseModel):
    approver: str
    roles: list[str]
    csrf_token: str = Field(description="send it as X-CSRF-Token with every change made with the cookie")
    expires_at: datetime = Field(description="when the session ends however much it is used")
    idle_seconds: int = Field(description="the session ends when unused this long")
    auditor: bool = Field(default=False, description="holds the auditor role: sees every request, and the report")


def _public(runtime, sessions, signed_in: SignedIn) -> SessionPublic:
    return SessionPublic(approver=signed_in.approver, roles=sorted(runtime.roles_of(signed_in.approver)),
                         csrf_token=signed_in.csrf_token, expires_at=signed_in.expires_at,
                         idle_seconds=int(sessions.idle.total_seconds()),
                         auditor=runtime.sees_all_overrides(runtime.roles_of(signed_in.approver)))


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post("", response_model=SessionPublic, summary="Sign in: exchange an approver's token for a session cookie")
def sign_in(body: SignIn, request: Request, response: Response, runtime: RuntimeDep,
            sessions: SessionsDep) -> SessionPublic:
    # A sign-in made by another site's page would sign the browser in as the attacker's approver.
    check_same_origin(request)
    throttle = request.app.state.sign_in_throttle
    client = _client(request)
    wait = throttle.wait(client)
    if wait:
        raise HTTPException(429, detail=f"too many failed sign-ins from {client}: try again in {wait} s",
                            headers={"Retry-After": str(wait)})
    approver = runtime.approvers.identify(body.token)
    if approver is None:
        throttle.failed(client)
        if runtime.agents.identify(body.token):
            raise HTTPException(403, detail="agent credentials cannot review overrides")
        raise HTTPException(401, detail="unknown approver token: use the token given to you as an approver")
    signed_in = sessions.start(approver, hash_token(body.token))
    runtime.recorder.record_event({"kind": EventKind.REVIEWER_SIGNED_IN, "actor": approver,
                                   "payload": {"client": client}})
    response.set_cookie(SESSION_COOKIE, signed_in.token, max_age=int(sessions.absolute.total_seconds()),
                        path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return _public(runtime, sessions, signed_in)


@router.get("", response_model=SessionPublic, summary="Who is signed in, and the session's CSRF token")
def current(runtime: RuntimeDep, sessions: SessionsDep,
            cookie: SessionCookie) -> SessionPublic:
    signed_in = session_of(runtime, sessions, cookie) if cookie else None
    if signed_in is None:
        raise HTTPException(401, detail="not signed in: POST /session with an approver's token")
    return _public(runtime, sessions, signed_in)


@router.delete("", status_code=204, summary="Sign out: the session ends now")
def sign_out(request: Request, runtime: RuntimeDep, sessions: SessionsDep,
             cookie: SessionCookie) -> Response:
    signed_in = session_of(runtime, sessions, cookie) if cookie else None
    if signed_in is not None:
        check_same_origin(request)
        check_csrf(request, signed_in)
        sessions.end(signed_in.token)
        runtime.recorder.record_event({"kind": EventKind.REVIEWER_SIGNED_OUT, "actor": signed_in.approver,
                                       "payload": {"client": _client(request)}})
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response
