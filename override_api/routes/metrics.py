"""`GET /metrics`: every cedargate metric in Prometheus's text format, for all the proxy's processes at once.

Open like other Prometheus exporters' (node_exporter, mitmproxy-free exporters alike): the API listens on
loopback by default, and what it shows are counts, not calls (no agent's URL or argument is a label).
Where the API is reachable by others (`--allow-non-loopback`), set CEDARGATE_METRICS_TOKEN in the
environment `cedargate run` starts in: then a scrape must send `Authorization: Bearer <that token>`
(Prometheus's `authorization` scrape option), and any other is refused with 401. An approver's token is
not accepted in its place, so a scraper's credential can decide nothing.
"""

from __future__ import annotations

import hmac
import os

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from override_api.deps import RuntimeDep
from proxy.observe import metrics

TOKEN_ENV = "CEDARGATE_METRICS_TOKEN"

router = APIRouter(tags=["metrics"])


def scrape_token() -> str | None:
    """The token a scrape must bear, from the environment; None when scrapes are open."""
    return os.environ.get(TOKEN_ENV) or None


@router.get("/metrics", summary="Prometheus metrics of every cedargate process (text exposition format)",
            response_class=Response,
            responses={200: {"content": {"text/plain": {}}}, 401: {"description": f"{TOKEN_ENV} is set and "
                                                                   "the scrape did not bear it"}})
def scrape(request: Request, runtime: RuntimeDep) -> Response:
    expected = request.app.state.metrics_token
    if expected is not None:
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        # As bytes: compare_digest refuses a str that is not ASCII, and headers arrive as Latin-1.
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode("latin-1"), expected.encode()):
            raise HTTPException(401, detail=f"send the metrics token ({TOKEN_ENV}) as Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    body = metrics.exposition([metrics.OverrideStatusCollector(runtime.overrides.count_by_status)])
    return Response(body, media_type=metrics.CONTENT_TYPE, headers={"Cache-Control": "no-store"})
