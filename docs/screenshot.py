"""Render the reviewer's inbox with example data in headless chromium and write docs/inbox.png (and
docs/request.png, one request's screen) for the README.

    .venv/bin/python docs/screenshot.py

It runs a real cedargate on free loopback ports with the bundled policies, has two agents make calls
that policy escalates (answered at once with Prefer: respond-async, so nothing goes upstream), records
one reviewer's vote and one question to an agent, then signs in on the page as a reviewer holding every
role and photographs it.
Needs chromium and chromium-driver (apt-get install chromium chromium-driver), as the browser tests do.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.browser import chromium  # noqa: E402
from tests.support.launch import start_cedargate  # noqa: E402

AGENTS = {"ops-bot": "example-ops-token", "billing-bot": "example-billing-token"}
APPROVERS = {"dana": ("example-dana-token", ["engineering-manager", "finance", "security", "lead-engineer"]),
             "sam": ("example-sam-token", ["security"])}


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_config(root: Path) -> Path:
    policies = root / "policies"
    shutil.copytree(REPO / "policies", policies, ignore=shutil.ignore_patterns("tests"))
    config = {
        "proxy": {"host": "127.0.0.1", "port": 0}, "api": {"host": "127.0.0.1", "port": 0},
        "policy_dir": str(policies), "state_dir": str(root / "state"),
        "agents": {name: {"token_sha256": sha256(token)} for name, token in AGENTS.items()},
        "approvers": {name: {"token_sha256": sha256(token), "roles": roles}
                      for name, (token, roles) in APPROVERS.items()},
    }
    path = root / "cedargate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def escalate(proxy_port: int) -> None:
    """The example calls: each escalated by a bundled policy, each answered at once (respond-async)."""
    def agent(name: str) -> httpx.Client:
        return httpx.Client(proxy=f"http://{name}:{AGENTS[name]}@127.0.0.1:{proxy_port}", timeout=30,
                            headers={"Prefer": "respond-async"})

    with agent("billing-bot") as billing:
        billing.post("http://api.payments.example/v1/refunds/o-1042", json={"amount": 900, "currency": "EUR"},
                     headers={"X-Agent-Justification": "Customer was charged twice for order 1042 (ticket 5531)",
                              "X-Agent-Confidence": "0.82", "X-Agent-Session": "support-5531"})
        billing.post("http://api.payments.example/v1/refunds/o-0977", json={"amount": 640, "currency": "USD"},
                     headers={"X-Agent-Justification": "Damaged on delivery; photos attached to ticket 5518"})
    with agent("ops-bot") as ops:
        ops.post("http://mcp.github.example/mcp", json={
            "jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": "delete_repository", "arguments": {"repo": "acme/old-site"}}},
            headers={"Accept": "application/json, text/event-stream",
                     "X-Agent-Justification": "Archived site, replaced by acme/site in 2024"})
        ops.post("http://127.0.0.1:9000/v1/instances/i-0abc/stop", json={"grace": 30},
                 headers={"X-Agent-Justification": "Instance wedged at 100% CPU; paging did not help",
                          "X-Agent-Confidence": "0.64"})
        ops.delete("http://localhost:9000/v1/volumes/vol-7",
                   headers={"X-Agent-Justification": "Orphaned volume of the decommissioned build farm"})


def main() -> None:
    out = REPO / "docs"
    with tempfile.TemporaryDirectory() as tmp:
        gate = start_cedargate(write_config(Path(tmp)))
        try:
            escalate(gate.proxy_port)
            api = httpx.Client(base_url=gate.api_url, timeout=10)
            sam = {"Authorization": f"Bearer {APPROVERS['sam'][0]}"}
            deadline = time.monotonic() + 15
            while len(found := api.get("/overrides", headers=sam).json()) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            volume = next(o for o in found if "/volumes/" in o["url"])
            api.post(f"/overrides/{volume['id']}/approve", headers=sam,
                     json={"reason": "Snapshot taken, vol-7 unused for 90 days"})
            dana = {"Authorization": f"Bearer {APPROVERS['dana'][0]}"}
            stop = next(o for o in api.get("/overrides", headers=dana).json() if "/stop" in o["url"])
            api.post(f"/overrides/{stop['id']}/request-info", headers=dana,
                     json={"question": "Is i-0abc still serving customers?"})
            with chromium(width=1400, height=720) as browser:
                browser.get(f"{gate.api_url}/inbox/sign-in")
                browser.find_element(By.ID, "token").send_keys(APPROVERS["dana"][0])
                browser.find_element(By.CSS_SELECTOR, "#sign-in button").click()
                WebDriverWait(browser, 15).until(
                    lambda b: len(b.find_elements(By.CSS_SELECTOR, "tr.request-row")) >= 5)
                time.sleep(0.5)
                browser.save_screenshot(str(out / "inbox.png"))
                refund = browser.find_element(
                    By.XPATH, "//tr[contains(@class, 'request-row')][.//td[contains(., 'o-1042')]]"
                              "//td[contains(@class, 'what')]/a")
                refund.click()
                WebDriverWait(browser, 15).until(lambda b: b.find_elements(By.ID, "status"))
                browser.set_window_size(1400, 1100)
                time.sleep(1.0)
                browser.save_screenshot(str(out / "request.png"))
        finally:
            gate.stop()
    print(f"wrote {out / 'inbox.png'} and {out / 'request.png'}")


if __name__ == "__main__":
    main()
