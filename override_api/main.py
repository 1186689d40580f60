"""Builds the override API's FastAPI app around a running cedargate core."""

from __future__ import annotations

from fastapi import FastAPI

from override_api.routes import health
from proxy.runtime import Runtime


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="cedargate override API",
        summary="Review what cedargate decided, and (next) grant or deny override requests.",
        version="0.1.0",
    )
    app.state.runtime = runtime
    app.include_router(health.router)
    return app
