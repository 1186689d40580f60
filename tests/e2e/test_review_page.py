"""The review page in a real browser (headless chromium, tests/support/browser.py) against a real
cedargate: its proxy holding the agent's calls, its API serving the page, a logging upstream, a SQLite
record. Each test does what a reviewer does (sign in, open, click) and checks what the reviewer sees,
what the agent is answered and what the upstream received.

One cedargate and one browser for the module, so it stays quick; each test escalates its own calls.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from e2e_support import Cedargate, start_cedargate, write_config
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import BUNDLED_POLICIES
from tests.support.browser import chromium


@pytest.fixture(scope="module")
def gate(tmp_path_factory, upstream) -> Iterator[Cedargate]:
    root = tmp_path_factory.mktemp("review-page")
    policies = root / "policies"
    shutil.copytree(BUNDLED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))
    started = start_cedargate(write_config(root / "cedargate.yaml", policies, root / "state", upstream))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


def wait_for(browser: webdriver.Chrome, css: str, timeout: float = 15.0):
    return WebDriverWait(browser, timeout).until(lambda b: b.find_elements(By.CSS_SELECTOR, css))


def test_the_api_docs_render_offline_from_the_apis_own_files(gate: Cedargate, browser: webdriver.Chrome):
    browser.get(f"{gate.api_url}/docs")
    operations = wait_for(browser, ".opblock-summary-path")
    paths = {element.text.replace("\u200b", "") for element in operations}
    assert {"/overrides", "/overrides/{override_id}/approve", "/session"} <= paths
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(gate.api_url) for url in loaded), loaded
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []  # no script blocked by the content security policy, nothing failed to load
