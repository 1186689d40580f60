"""The review page (`/inbox`, one request, history, sign-in) and the API's own docs (`/docs`), all served
from files in this package: no CDN, so they work where the reviewers have no internet.

Each page is a static HTML shell; `static/inbox.js` fills it from the JSON API with the session cookie
(signing in first where there is none). The pages hold no data of their own, so serving them needs no
sign-in; the API behind them does.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    # Never cached: a page from before an upgrade must not run against the new API.
    return FileResponse(STATIC / name, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/inbox")


@router.get("/inbox")
def inbox() -> FileResponse:
    return _page("inbox.html")


@router.get("/inbox/sign-in")
def sign_in() -> FileResponse:
    return _page("sign-in.html")


@router.get("/inbox/requests/{override_id}")
def one_request(override_id: str) -> FileResponse:
    return _page("request.html")


@router.get("/inbox/history")
def history() -> FileResponse:
    return _page("history.html")


@router.get("/inbox/report")
def report() -> FileResponse:
    # For auditors: the page asks GET /report, which refuses everyone else (403), and says so.
    return _page("report.html")


@router.get("/docs")
def docs() -> FileResponse:
    return _page("docs.html")
