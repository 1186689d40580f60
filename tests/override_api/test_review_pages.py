"""The review page's files as the API serves them: every page from this package, none of them loading
anything from elsewhere or running inline script, and the script never building markup from strings."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from override_api.routes.pages import STATIC

PAGES = ["/inbox", "/inbox/sign-in", "/inbox/requests/ovr-1", "/inbox/history", "/inbox/report", "/docs"]


@pytest.mark.parametrize("path", PAGES)
def test_each_page_is_served_without_a_session_and_loads_only_local_files(client: TestClient, path: str):
    page = client.get(path)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-store"
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)
    # Every script comes from a file: the content security policy forbids inline script anyway.
    assert re.findall(r"<script[^>]*>", page.text) and all(
        'src="/static/' in tag for tag in re.findall(r"<script[^>]*>", page.text))


def test_the_root_leads_to_the_inbox(client: TestClient):
    answer = client.get("/", follow_redirects=False)
    assert (answer.status_code, answer.headers["location"]) == (307, "/inbox")


@pytest.mark.parametrize("name", ["inbox.js", "report.js"])
def test_the_script_never_parses_markup(name: str):
    script = (STATIC / name).read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
