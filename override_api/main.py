"""Builds the override API's FastAPI app around a running cedargate core; errors are problem+json.

Besides the JSON API it serves the review page (`routes/pages.py`, files in `static/`) with its sign-in
(`routes/session.py`), and Swagger UI at /docs from the assets of the `swagger-ui-py` package, so
neither needs a CDN. Every answer carries the headers of `override_api.security`.
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from override_api.answers import JSONAnswer
from override_api.routes import health, metrics, overrides, pages, report, session
from override_api.security import SecurityHeaders
from proxy.cedar.escalation import parse_duration
from proxy.oversight.reviewer_sessions import ReviewerSessions, SignInThrottle
from proxy.runtime import Runtime
from proxy.vocabulary.problems import MEDIA_TYPE, http_problem

PROBLEM = MEDIA_TYPE
SWAGGER_UI = Path(swagger_ui.__file__).parent / "static"


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="cedargate override API",
        summary="Review held calls that policy denied, and grant a one-time exception or deny it.",
        version="0.1.0",
        # Served by `routes/pages.py` from local files; FastAPI's own load Swagger UI and ReDoc from a CDN.
        docs_url=None, redoc_url=None,
        default_response_class=JSONAnswer,
    )
    app.state.runtime = runtime
    app.state.sessions = ReviewerSessions(
        runtime.overrides.engine, idle=parse_duration(runtime.settings.review_session_idle),
        absolute=parse_duration(runtime.settings.review_session_max_age))
    app.state.sign_in_throttle = SignInThrottle()
    app.state.metrics_token = metrics.scrape_token()  # read once, at start, like the approvers' tokens
    app.add_middleware(SecurityHeaders)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(overrides.router)
    app.include_router(report.router)
    app.include_router(session.router)
    app.include_router(pages.router)
    app.mount("/static/swagger-ui", StaticFiles(directory=SWAGGER_UI), name="swagger-ui")
    app.mount("/static", StaticFiles(directory=pages.STATIC), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = http_problem(exc.status_code, exc.detail)
        return JSONAnswer(body, exc.status_code, headers=exc.headers, media_type=PROBLEM)

    @app.exception_handler(RequestValidationError)
    async def validation_problem(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        body = http_problem(422, detail, title="Request is not valid", errors=errors)
        return JSONAnswer(body, 422, media_type=PROBLEM)

    return app

