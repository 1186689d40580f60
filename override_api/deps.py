"""FastAPI dependencies: the running core, taken from the app's state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from proxy.runtime import Runtime


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
