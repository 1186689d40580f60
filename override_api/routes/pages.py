"""The review page (`/inbox`, one request, history, sign-in) and the API's own docs (`/docs`), all served
from files in this package: no CDN, so they work where the reviewers have no internet.

Each page is a static HTML shell; `static/inbox.js` fills it from the JSON API with the session cookie
(signing in first where there is none). The pages hold no data of their own, so serving them needs no
sign-in; the API behind them does.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    # Never cached: a page from before an upgrade must not run against the new API.
    return FileResponse(STATIC / name, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})


@router.get("/docs")
def docs() -> FileResponse:
    return _page("docs.html")
