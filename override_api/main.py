"""Builds the override API's FastAPI app around a running cedargate core; errors are problem+json."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from override_api.routes import health, overrides
from proxy.runtime import Runtime
from proxy.vocabulary.problems import MEDIA_TYPE, http_problem

PROBLEM = MEDIA_TYPE


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="cedargate override API",
        summary="Review held calls that policy denied, and grant a one-time exception or deny it.",
        version="0.1.0",
    )
    app.state.runtime = runtime
    app.include_router(health.router)
    app.include_router(overrides.router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = http_problem(exc.status_code, exc.detail)
        return JSONResponse(body, exc.status_code, headers=exc.headers, media_type=PROBLEM)

    @app.exception_handler(RequestValidationError)
    async def validation_problem(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        body = http_problem(422, detail, title="Request is not valid", errors=errors)
        return JSONResponse(body, 422, media_type=PROBLEM)

    return app

