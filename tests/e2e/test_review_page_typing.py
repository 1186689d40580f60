"""Approve with changes on the review page, in a real headless browser: what goes is what the reviewer typed.

A number input whose text the browser cannot read as a number (cleared, or a lone `-`) has the value "",
which `Number` reads as 0: the page approved a refund of 0 that nobody typed.
A whole number typed as `1e3` was sent as 1 (`parseInt`). The page now refuses what is not a number of
the field's type, and nothing is approved.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from e2e_support import Cedargate, Upstream
from selenium import webdriver
from selenium.webdriver.common.by import By
from test_review_page import (  # noqa: F401  (gate, browser: fixtures)
    agent_client,
    api,
    browser,
    decide,
    gate,
    open_request,
    opened,
    signed_in,
    upstream_bodies,
)


def test_an_amount_the_browser_cannot_read_is_refused_not_sent_as_zero(
        gate: Cedargate, browser: webdriver.Chrome, upstream: Upstream):  # noqa: F811
    url = f"http://localhost:{upstream.http_port}/v1/refunds/o-typed"
    with ThreadPoolExecutor(1) as pool, agent_client(gate, headers={"Prefer": "respond-async"}) as http:
        pool.submit(http.post, url, json={"amount": 100, "currency": "EUR"}).result(timeout=30)
        request = opened(gate, url)
        signed_in(browser, gate)
        open_request(browser, gate, request["id"])
        amount = browser.find_element(By.ID, "change-amount")
        for typed in ("", "-"):
            amount.clear()
            if typed:
                amount.send_keys(typed)
            answer = decide(browser, "approve-changes", reason="half now")
            assert "amount" in answer and "not a number" in answer, (typed, answer)
            browser.find_element(By.ID, "reason").clear()
    shown = api(gate, "GET", f"/overrides/{request['id']}").json()
    assert (shown["status"], shown["votes"]) == ("pending", [])
    assert upstream_bodies(upstream, "/v1/refunds/o-typed") == []
