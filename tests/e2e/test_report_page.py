"""The report page (/inbox/report) in a real browser (headless chromium) against a real cedargate: an
auditor sees the charts of what reviewers decided; an approver without the auditor role is refused."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator

import httpx
import pytest
from e2e_support import APPROVERS, Cedargate, Upstream, start_cedargate, write_config
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.conftest import BUNDLED_POLICIES
from tests.support.browser import chromium, until

AUDITOR, AUDITOR_TOKEN = "audrey", "audrey-token-7"


@pytest.fixture(scope="module")
def gate(tmp_path_factory, upstream: Upstream) -> Iterator[Cedargate]:
    root = tmp_path_factory.mktemp("report-page")
    approvers = {name: {"token_sha256": hashlib.sha256(token.encode()).hexdigest(), "roles": roles}
                 for name, (token, roles) in {**APPROVERS, AUDITOR: (AUDITOR_TOKEN, ["auditor"])}.items()}
    policies = root / "policies"
    shutil.copytree(BUNDLED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))
    started = start_cedargate(write_config(root / "c.yaml", policies, root / "state", upstream, approvers=approvers))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


def sign_in_to_the_report(browser: webdriver.Chrome, gate: Cedargate, token: str) -> None:
    browser.delete_all_cookies()
    browser.get(f"{gate.api_url}/inbox/report")
    until(browser, lambda b: b.find_elements(By.ID, "token"))
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#sign-in button").click()
    until(browser, lambda b: b.current_url.startswith(f"{gate.api_url}/inbox/report"))


def test_an_auditor_sees_the_charts_and_a_reviewer_is_refused(gate: Cedargate, browser: webdriver.Chrome,
                                                             upstream: Upstream) -> None:
    with httpx.Client(proxy=gate.proxy_url, timeout=30) as agent:
        held = agent.post(f"http://127.0.0.1:{upstream.http_port}/v1/instances/i-report/stop",
                          headers={"Prefer": "respond-async"})
    assert held.json()["type"].endswith("override-pending")
    erin = {"Authorization": f"Bearer {APPROVERS['erin'][0]}"}
    approved = httpx.post(f"{gate.api_url}/overrides/{held.json()['override_id']}/approve", headers=erin,
                          json={"reason": "fine"}, timeout=10)
    assert approved.status_code == 200

    sign_in_to_the_report(browser, gate, APPROVERS["erin"][0])
    refused = browser.find_element(By.ID, "refused")
    until(browser, lambda b: refused.is_displayed())
    assert refused.text == "the report is for approvers holding the auditor role (auditor); erin does not"
    assert not browser.find_element(By.ID, "report").is_displayed()
    assert not browser.find_elements(By.CSS_SELECTOR, '#bar a[href="/inbox/report"]')

    sign_in_to_the_report(browser, gate, AUDITOR_TOKEN)
    report = browser.find_element(By.ID, "report")
    until(browser, lambda b: report.is_displayed())
    assert browser.find_elements(By.CSS_SELECTOR, '#bar a[href="/inbox/report"]')
    bars = browser.find_elements(By.CSS_SELECTOR, "#policy-chart svg rect.o-unchanged")
    assert len(bars) == 1 and bars[0].find_element(By.TAG_NAME, "title").get_attribute("textContent") == \
        "approved as sent: 1"
    assert "protect-production-instances" in browser.find_element(By.ID, "policy-chart").text
    assert browser.find_elements(By.CSS_SELECTOR, "#reviewer-chart svg rect.rate")
    assert "erin" in browser.find_element(By.ID, "reviewer-chart").text
    assert browser.find_element(By.ID, "candidates").text.startswith("None: no policy had 500 or more")
    # Nothing blocked by the content security policy, no script error; the network's are the answers asked
    # for (401 before signing in, erin's 403) and the favicon nobody serves.
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
    assert errors == []
