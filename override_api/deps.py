"""FastAPI dependencies: the running core, and the approver behind a bearer token or a session cookie.

Scripts and the CLI send `Authorization: Bearer <approver token>`. The review page signs in once
(`routes/session.py`) and then sends the session cookie, which a browser attaches to requests that
other sites make it send, so every change made with the cookie must also prove it comes from the page:
the session's CSRF token in `X-CSRF-Token`, and, where the browser says where the request came from
(`Origin`, `Sec-Fetch-Site`), this origin. A bearer token is never sent by a browser on its own, so
requests that carry one need none of that.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from proxy.oversight.reviewer_sessions import ReviewerSessions, SignedIn
from proxy.oversight.urgency import mark_urgent
from proxy.runtime import Runtime

SESSION_COOKIE = "cedargate_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# The dependencies that only read memory are `async def`: FastAPI runs a plain `def` dependency on a
# worker thread, and each such hop waits for the event loop and the GIL, which a busy proxy shares (three
# hops were about 10 ms of an approval's way to the held call under load).
async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_sessions(request: Request) -> ReviewerSessions:
    return request.app.state.sessions


_bearer = HTTPBearer(auto_error=False, description="An approver's token (see `approvers` in the config)")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False,
                       description="The review page's session, from POST /session (changes also need X-CSRF-Token)")

RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SessionsDep = Annotated[ReviewerSessions, Depends(get_sessions)]
SessionCookie = Annotated[str | None, Depends(_cookie)]


@dataclass(frozen=True)
class Approver:
    id: str
    roles: frozenset[str]


def session_of(runtime: Runtime, sessions: ReviewerSessions, token: str) -> SignedIn | None:
    """The live session of a cookie's token, if its approver may still sign in with the token they used."""
    return sessions.find(token, runtime.approvers.holds)


async def current_approver(
    request: Request, runtime: RuntimeDep, sessions: SessionsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)], cookie: SessionCookie,
) -> Approver:
    if credentials is not None:  # a token: compared in memory, on the event loop
        approver = runtime.approvers.identify(credentials.credentials)
        if approver is None:
            if runtime.agents.identify(credentials.credentials):
                raise HTTPException(403, detail="agent credentials cannot review overrides")
            raise HTTPException(401, detail="unknown approver token", headers={"WWW-Authenticate": "Bearer"})
        if request.method not in SAFE_METHODS:  # an approver's change goes ahead of the calls (proxy.oversight.urgency)
            mark_urgent()
        return Approver(approver, runtime.roles_of(approver))
    if cookie is not None:  # a session: looked up in the store, off the event loop
        signed_in = await run_in_threadpool(session_of, runtime, sessions, cookie)
        if signed_in is None:
            raise HTTPException(401, detail="your session has ended (signed out, idle or too old): sign in again",
                                headers={"WWW-Authenticate": "Bearer"})
        if request.method not in SAFE_METHODS:
            check_same_origin(request)
            check_csrf(request, signed_in)
            mark_urgent()
        return Approver(signed_in.approver, runtime.roles_of(signed_in.approver))
    raise HTTPException(401, detail="send an approver token: Authorization: Bearer <token> (or sign in at /inbox)",
                        headers={"WWW-Authenticate": "Bearer"})


def check_same_origin(request: Request) -> None:
    """Refuse a request the browser says another site made (where it says so: older browsers may not)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        raise HTTPException(403, detail=f"refused a change requested from another site (Sec-Fetch-Site: {site})")
    origin = request.headers.get("origin")
    if origin is not None and origin != own_origin(request):
        raise HTTPException(403, detail="refused a change requested from another origin: "
                                        f"Origin {origin} is not {own_origin(request)}")


def check_csrf(request: Request, signed_in: SignedIn) -> None:
    # Compared as bytes: compare_digest raises on a str that is not ASCII, and headers are read as Latin-1.
    sent = request.headers.get(CSRF_HEADER, "").encode("latin-1")
    if not sent or not hmac.compare_digest(sent, signed_in.csrf_token.encode()):
        raise HTTPException(403, detail=f"missing or wrong {CSRF_HEADER}: a change made with the session cookie "
                                        "must carry the session's CSRF token (GET /session gives it)")


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


CurrentApprover = Annotated[Approver, Depends(current_approver)]
