"""FastAPI dependencies: the running core, and the approver behind a bearer token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from proxy.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

_bearer = HTTPBearer(auto_error=False, description="An approver's token (see `approvers` in the config)")


@dataclass(frozen=True)
class Approver:
    id: str
    roles: frozenset[str]


def current_approver(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Approver:
    if credentials is None:
        raise HTTPException(401, detail="send an approver token: Authorization: Bearer <token>",
                            headers={"WWW-Authenticate": "Bearer"})
    approver = runtime.approvers.identify(credentials.credentials)
    if approver is None:
        if runtime.agents.identify(credentials.credentials):
            raise HTTPException(403, detail="agent credentials cannot review overrides")
        raise HTTPException(401, detail="unknown approver token", headers={"WWW-Authenticate": "Bearer"})
    return Approver(approver, runtime.roles_of(approver))


CurrentApprover = Annotated[Approver, Depends(current_approver)]
