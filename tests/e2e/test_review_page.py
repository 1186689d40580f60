"""The review page in a real browser (headless chromium, tests/support/browser.py) against a real
cedargate: its proxy holding the agent's calls, its API serving the page, a logging upstream, a SQLite
record. Each test does what a reviewer does (sign in, open, click) and checks what the reviewer sees,
what the agent is answered and what the upstream received.

One cedargate and one browser for the module, so it stays quick; each test escalates its own calls.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from e2e_support import APPROVERS, CEDARGATE, Cedargate, Upstream, start_cedargate, write_config
from selenium import webdriver
from selenium.webdriver.common.by import By

from tests.conftest import BUNDLED_POLICIES
from tests.support.browser import chromium, until

# Refunds on the logging upstream (as `localhost`): a manifest route with typed fields, so a reviewer may
# approve one with a changed amount. The bundled policies stay; the ops calls go to 127.0.0.1.
REFUNDS_HOST = {"host": "localhost", "routes": [
    {"route": "POST /v1/refunds/{order_id}", "action": "refund_order", "severity": "high", "reversible": False,
     "fields": {"order_id": {"from": "path"}, "amount": {"from": "body", "type": "Decimal"},
                "currency": {"from": "body", "required": False}}}]}
REFUND_POLICIES = """
@id("ops-refunds")
permit (principal in Team::"ops", action == Action::"refund_order", resource);

@id("refunds-over-50")
@reason("Refunds over 50 need an engineering manager.")
@escalate("engineering-manager")
forbid (principal, action == Action::"refund_order", resource)
when { context.amount.greaterThan(decimal("50.0")) };
"""


# An escalation chain on seconds: a reboot is the engineering managers' call, and security's too from 2 s on.
CHAIN_POLICIES = """
@id("ops-reboots")
permit (principal in Team::"ops", action == Action::"post", resource)
when { context.path like "/v1/instances/*/reboot" };

@id("reboots-climb")
@reason("Rebooting an instance needs an engineering manager; security is asked too if nobody answers.")
@escalate("engineering-manager")
@escalate_after("2s: security")
@expires("10m")
forbid (principal, action == Action::"post", resource)
when { context.path like "/v1/instances/*/reboot" };
"""


@pytest.fixture(scope="module")
def gate(tmp_path_factory, upstream) -> Iterator[Cedargate]:
    root = tmp_path_factory.mktemp("review-page")
    policies = root / "policies"
    shutil.copytree(BUNDLED_POLICIES, policies, ignore=shutil.ignore_patterns("tests"))
    manifest = yaml.safe_load((policies / "actions.yaml").read_text())
    manifest["hosts"].append(REFUNDS_HOST)
    (policies / "actions.yaml").write_text(yaml.safe_dump(manifest))
    (policies / "refunds.cedar").write_text(REFUND_POLICIES)
    (policies / "chains.cedar").write_text(CHAIN_POLICIES)
    schema = subprocess.run([str(CEDARGATE), "schema", str(policies)], capture_output=True, text=True, timeout=30)
    assert schema.returncode == 0, schema.stderr
    started = start_cedargate(write_config(root / "cedargate.yaml", policies, root / "state", upstream))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        yield driver


def wait_for(browser: webdriver.Chrome, css: str, timeout: float = 15.0):
    return until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, css), timeout)


def test_the_api_docs_render_offline_from_the_apis_own_files(gate: Cedargate, browser: webdriver.Chrome):
    browser.get(f"{gate.api_url}/docs")
    operations = wait_for(browser, ".opblock-summary-path")
    paths = {element.text.replace("\u200b", "") for element in operations}
    assert {"/overrides", "/overrides/{override_id}/approve", "/session"} <= paths
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(gate.api_url) for url in loaded), loaded
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []  # no script blocked by the content security policy, nothing failed to load


# --- the reviewer's session and the held calls ---------------------------------------------------------


def agent_client(gate: Cedargate, **kwargs) -> httpx.Client:
    return httpx.Client(proxy=gate.proxy_url, verify=ssl.create_default_context(cafile=gate.ca_cert),
                        timeout=60, **kwargs)


def api(gate: Cedargate, method: str, path: str, approver: str = "erin", **kwargs) -> httpx.Response:
    return httpx.request(method, f"{gate.api_url}{path}", timeout=10,
                         headers={"Authorization": f"Bearer {APPROVERS[approver][0]}"}, **kwargs)


def stop_url(upstream: Upstream, instance: str) -> str:
    """A production instance's stop: held for an engineering manager (erin)."""
    return f"http://127.0.0.1:{upstream.http_port}/v1/instances/{instance}/stop"


def opened(gate: Cedargate, url: str, approver: str = "erin", timeout: float = 15.0) -> dict:
    """The override request opened for the call to `url`, once it is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [o for o in api(gate, "GET", "/overrides?limit=1000", approver).json() if o["url"] == url]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no override request for {url}")


def signed_in(browser: webdriver.Chrome, gate: Cedargate, approver: str = "erin") -> None:
    """The browser signed in as `approver` through the sign-in page (signing out whoever was)."""
    browser.delete_all_cookies()
    browser.get(f"{gate.api_url}/inbox")
    wait_for(browser, "#token")  # no session: the inbox sent the browser to sign in
    assert browser.current_url == f"{gate.api_url}/inbox/sign-in?next=%2Finbox"
    browser.find_element(By.ID, "token").send_keys(APPROVERS[approver][0])
    browser.find_element(By.CSS_SELECTOR, "#sign-in button").click()
    until(browser, lambda b: b.current_url == f"{gate.api_url}/inbox")
    until(browser, lambda b: b.find_element(By.ID, "approver").text == approver)


ROW_PARTS = ("agent", "what", "target", "time-left", "risk", "votes", "roles", "chain-cell")


def inbox_row(browser: webdriver.Chrome, override_id: str, timeout: float = 15.0) -> dict[str, str]:
    """The text of each part of the inbox's row for the request (by its class), once the page's polling
    shows the row. Read in one script: the inbox re-renders its rows on every poll, so a row element held
    from one read to the next may be gone."""
    return until(browser, lambda b: b.execute_script(
        "const row = document.querySelector(arguments[0]);"
        "return row && Object.fromEntries(arguments[1].map("
        "  (part) => [part, row.querySelector('.' + part).innerText]));",
        f'tr.request-row[data-id="{override_id}"]', list(ROW_PARTS)), timeout)


def click(browser: webdriver.Chrome, css: str) -> None:
    """Click what `css` finds, looked up again if the page re-rendered it in between."""
    until(browser, lambda b: b.find_element(By.CSS_SELECTOR, css).click() or True)


def open_request(browser: webdriver.Chrome, gate: Cedargate, override_id: str) -> None:
    browser.get(f"{gate.api_url}/inbox/requests/{override_id}")
    wait_for(browser, "#status")


def decide(browser: webdriver.Chrome, button: str, *, reason: str = "", question: str = "") -> str:
    """Click a decision button (with the reason or question typed first); the page's answer."""
    if reason:
        browser.find_element(By.ID, "reason").send_keys(reason)
    if question:
        browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, button).click()
    result = browser.find_element(By.ID, "decide-result")
    until(browser, lambda b: result.text)
    return result.text


def test_a_reviewer_signs_in_sees_the_held_call_in_context_and_approves_it_once(
        gate: Cedargate, browser: webdriver.Chrome, upstream: Upstream):
    url = stop_url(upstream, "i-approve")
    with ThreadPoolExecutor(1) as pool, agent_client(gate) as http:
        held = pool.submit(http.post, url, json={"grace": 30, "notify": ["oncall"]},
                           headers={"X-Agent-Justification": "instance is wedged, paging did not help",
                                    "X-Agent-Confidence": "0.9", "X-Agent-Session": "incident-42"})
        request = opened(gate, url)
        signed_in(browser, gate)

        row = inbox_row(browser, request["id"])
        assert row["agent"] == "ops-bot"
        assert row["what"] == "post"
        assert row["target"] == f"POST 127.0.0.1:{upstream.http_port}/v1/instances/i-approve/stop"
        assert row["time-left"].endswith(" s")  # 30 min left: "29 min 59 s"
        assert row["risk"] == "high"  # @severity("high"), @reversible("true")
        assert row["votes"] == "none yet"
        assert row["roles"] == "engineering-manager"
        click(browser, f'tr.request-row[data-id="{request["id"]}"] .what a')

        wait_for(browser, "#status")
        assert browser.current_url == f"{gate.api_url}/inbox/requests/{request['id']}"
        assert browser.find_element(By.ID, "status").text == "pending"
        call = browser.find_element(By.ID, "call").text
        assert f"POST {url}" in call
        assert json.loads(browser.find_element(By.ID, "body").text) == {"grace": 30, "notify": ["oncall"]}
        assert "\n  " in browser.find_element(By.ID, "body").text  # pretty-printed
        assert "proxy-authorization" not in call.lower()
        why = browser.find_element(By.ID, "why").text
        assert '@id("protect-production-instances")' in why
        assert "Stopping an instance on a production-critical host needs a human decision." in why
        told = browser.find_element(By.ID, "agent").text
        assert "instance is wedged, paging did not help" in told and "0.9" in told and "incident-42" in told
        # The agent's calls in its session, this one marked; its context is served by /context.
        wait_for(browser, "#recent tr.this-request")
        assert "This agent's last calls in session incident-42" in browser.find_element(By.ID, "recent").text
        assert browser.find_element(By.CSS_SELECTOR, "#recent tr.this-request .col-decision").text == "escalate"
        assert upstream_calls(upstream, "i-approve") == []  # held, not forwarded

        assert decide(browser, "approve", reason="checked with on-call") == (
            "Approved — the request is now granted.")
        response = held.result(timeout=30)
    assert response.status_code == 200
    assert upstream_calls(upstream, "i-approve") == [b'{"grace":30,"notify":["oncall"]}']
    until(browser, lambda b: b.find_element(By.ID, "status").text == "released")
    assert "erin approved: checked with on-call" in browser.find_element(By.ID, "votes").text
    # The request's audit rows, as the page shows them after the decision.
    until(browser, lambda b: "release" in audit_kinds(b))
    kinds = audit_kinds(browser)
    assert [k for k in kinds if k in ("override_created", "approval", "grant", "release")] == [
        "override_created", "approval", "grant", "release"]


def audit_kinds(browser: webdriver.Chrome) -> list[str]:
    return [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#audit td.col-kind")]


def upstream_calls(upstream: Upstream, instance: str) -> list[bytes]:
    return [c.body for c in upstream.calls if f"/{instance}/" in c.path]


def test_a_denial_with_its_reason_is_what_the_agent_is_told(
        gate: Cedargate, browser: webdriver.Chrome, upstream: Upstream):
    url = stop_url(upstream, "i-deny")
    with ThreadPoolExecutor(1) as pool, agent_client(gate) as http:
        held = pool.submit(http.post, url, json={"grace": 0})
        request = opened(gate, url)
        signed_in(browser, gate)
        open_request(browser, gate, request["id"])
        # The production stop approved in the test before: a similar request (same policy, same action).
        wait_for(browser, "#similar-outcomes")
        assert browser.find_element(By.ID, "similar-outcomes").text == (
            "Decided before under the same policy: 1 released")

        assert decide(browser, "deny") == "Say why you deny it: the agent is told your reason."
        assert api(gate, "GET", f"/overrides/{request['id']}").json()["status"] == "pending"
        assert decide(browser, "deny", reason="not during the sale, try after 18:00") == (
            "Denied — the request is now denied.")
        response = held.result(timeout=30)
    assert response.status_code == 403
    problem = response.json()
    assert problem["type"] == "urn:cedargate:problem:override-denied"
    assert "not during the sale, try after 18:00" in problem["detail"]
    assert upstream_calls(upstream, "i-deny") == []


def test_a_change_without_the_csrf_token_is_refused(gate: Cedargate, browser: webdriver.Chrome, upstream: Upstream):
    url = stop_url(upstream, "i-csrf")
    with agent_client(gate, headers={"Prefer": "respond-async"}) as http:
        assert http.post(url).status_code == 403
    request = opened(gate, url)
    signed_in(browser, gate)
    # What a script would send with the cookie alone: the browser adds the cookie, Origin and Sec-Fetch-Site.
    answer = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', credentials: 'same-origin',"
        " headers: {'Content-Type': 'application/json'}, body: JSON.stringify({reason: 'sure'})})"
        ".then(r => r.json().then(b => done([r.status, b.detail])));",
        f"/overrides/{request['id']}/approve")
    assert answer[0] == 403 and answer[1].startswith("missing or wrong X-CSRF-Token")
    assert api(gate, "GET", f"/overrides/{request['id']}").json()["status"] == "pending"


def test_another_roles_request_is_not_shown(gate: Cedargate, browser: webdriver.Chrome, upstream: Upstream):
    stop, volume = stop_url(upstream, "i-roles"), f"http://127.0.0.1:{upstream.http_port}/v1/volumes/vol-roles"
    with agent_client(gate, headers={"Prefer": "respond-async"}) as http:
        assert http.post(stop).status_code == 403
        assert http.delete(volume).status_code == 403
    mine, theirs = opened(gate, stop), opened(gate, volume, approver="sam")
    signed_in(browser, gate)

    inbox_row(browser, mine["id"])
    shown = until(browser, lambda b: {row.get_attribute("data-id")
                                      for row in b.find_elements(By.CSS_SELECTOR, "tr.request-row")})
    assert mine["id"] in shown and theirs["id"] not in shown
    browser.get(f"{gate.api_url}/inbox/requests/{theirs['id']}")
    until(browser, lambda b: b.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == f"no override request {theirs['id']}"


def test_agent_controlled_text_with_html_stays_text(gate: Cedargate, browser: webdriver.Chrome, upstream: Upstream):
    markup = '<img src=x id=injected onerror="document.title=1"><b class="injected">bold</b>'
    url = stop_url(upstream, "i-markup")
    with agent_client(gate, headers={"Prefer": "respond-async"}) as http:
        assert http.post(url, json={"note": markup},
                         headers={"X-Agent-Justification": markup, "X-Note": markup}).status_code == 403
    request = opened(gate, url)
    signed_in(browser, gate)
    open_request(browser, gate, request["id"])

    assert markup in browser.find_element(By.ID, "agent").text
    assert markup in browser.find_element(By.ID, "call").text  # the header
    assert json.loads(browser.find_element(By.ID, "body").text) == {"note": markup}
    assert browser.find_elements(By.CSS_SELECTOR, "#injected, .injected, main img") == []
    assert browser.title != "1"


def test_a_refund_approved_with_a_changed_amount_reaches_the_upstream_changed_once(
        gate: Cedargate, browser: webdriver.Chrome, upstream: Upstream):
    url = f"http://localhost:{upstream.http_port}/v1/refunds/o-page"
    with ThreadPoolExecutor(1) as pool, agent_client(gate) as http:
        held = pool.submit(http.post, url, json={"amount": 100, "currency": "EUR"})
        request = opened(gate, url)
        signed_in(browser, gate)
        assert inbox_row(browser, request["id"])["what"] == "refund_order"
        open_request(browser, gate, request["id"])
        badges = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#summary .badge")]
        assert badges == ["high", "irreversible"]  # the manifest's classification of the route

        amount = browser.find_element(By.ID, "change-amount")
        assert (amount.get_attribute("type"), amount.get_attribute("value")) == ("number", "100")
        assert decide(browser, "approve-changes") == "Change a value first, or use Approve."
        amount.clear()
        amount.send_keys("50")
        assert decide(browser, "approve-changes", reason="half now, half when the parcel is back") == (
            "Approved with changes — the request is now granted.")
        response = held.result(timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Cedargate-Changed"] == "amount"
    assert [json.loads(body) for body in upstream_bodies(upstream, "/v1/refunds/o-page")] == [
        {"amount": 50, "currency": "EUR"}]
    until(browser, lambda b: b.find_element(By.ID, "status").text == "released")
    assert "amount" in browser.find_element(By.ID, "call").text  # "Changed by the reviewer"

    browser.get(f"{gate.api_url}/inbox/history")
    wait_for(browser, f'tr.history-row[data-id="{request["id"]}"]')
    decided = browser.find_element(By.CSS_SELECTOR, f'tr.history-row[data-id="{request["id"]}"]')
    assert decided.find_element(By.CSS_SELECTOR, ".who").text == "erin"
    assert decided.find_element(By.CSS_SELECTOR, ".changed").text == "amount → 50"
    assert decided.find_element(By.CSS_SELECTOR, ".why").text == "half now, half when the parcel is back"


def upstream_bodies(upstream: Upstream, path: str) -> list[bytes]:
    return [c.body for c in upstream.calls if c.path == path]


def test_a_question_from_the_page_reaches_the_agent_and_its_answer_the_page(
        gate: Cedargate, browser: webdriver.Chrome, upstream: Upstream):
    url = stop_url(upstream, "i-question")
    question, answer = "Which customers are on i-question now?", "None: drained at 09:00 (OPS-12)"
    with ThreadPoolExecutor(2) as pool, agent_client(gate) as http:
        held = pool.submit(http.post, url, json={"grace": 30}, headers={"X-Agent-Justification": "wedged"})
        request = opened(gate, url)
        signed_in(browser, gate)
        open_request(browser, gate, request["id"])
        assert browser.find_element(By.ID, "conversation").text.endswith("No questions asked yet.")

        assert decide(browser, "ask", question=question) == "Asked the agent — the request is now needs info."
        told = held.result(timeout=30)
        assert told.status_code == 403
        assert (told.json()["type"], told.json()["question"]) == (
            "urn:cedargate:problem:override-needs-info", question)

        # The agent answers by retrying with a new justification; the page, polling, shows the answer.
        retry = pool.submit(http.post, url, json={"grace": 30}, headers={"X-Agent-Justification": answer})
        until(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#conversation li")) == 2)
        turns = [(turn.find_element(By.CSS_SELECTOR, ".turn-by").text,
                  turn.find_element(By.CSS_SELECTOR, ".turn-text").text)
                 for turn in browser.find_elements(By.CSS_SELECTOR, "#conversation li")]
        assert turns == [("Question from erin", question), ("Answer from ops-bot", answer)]
        assert upstream_calls(upstream, "i-question") == []

        assert decide(browser, "approve", reason="drained, fine") == "Approved — the request is now granted."
        released = retry.result(timeout=30)
    assert released.status_code == 200
    assert upstream_calls(upstream, "i-question") == [b'{"grace":30}']


def test_the_inbox_and_the_request_page_show_where_a_request_stands_in_its_chain(
        gate: Cedargate, browser: webdriver.Chrome, upstream: Upstream):
    url = f"http://127.0.0.1:{upstream.http_port}/v1/instances/i-chain/reboot"
    with agent_client(gate) as http:
        assert http.post(url, headers={"Prefer": "respond-async"}).status_code == 403
    request = opened(gate, url)
    signed_in(browser, gate)
    # erin and max hold the role and have nothing else waiting: the tie goes by name.
    until(browser, lambda b: "primary: erin" in inbox_row(b, request["id"])["chain-cell"])
    assert "tier" in inbox_row(browser, request["id"])["chain-cell"]

    open_request(browser, gate, request["id"])
    wait_for(browser, "#chain li.chain-tier")
    tiers = browser.find_elements(By.CSS_SELECTOR, "#chain li.chain-tier")
    assert [t.find_element(By.CSS_SELECTOR, ".tier-roles").text for t in tiers] == ["engineering-manager",
                                                                                    "security"]
    assert browser.find_element(By.ID, "primary-reviewer").text == "erin"
    # Tier 2 comes 2 s after the opening: the polling page marks it reached and current.
    until(browser, lambda b: "current" in b.find_element(
        By.CSS_SELECTOR, '#chain li.chain-tier[data-tier="2"]').get_attribute("class"), 20)
    assert "expiry at" in browser.find_element(By.ID, "next-step").text
    # Security may decide it now, and sees it.
    assert api(gate, "GET", f"/overrides/{request['id']}", "sam").status_code == 200
