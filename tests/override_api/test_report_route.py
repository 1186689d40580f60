"""`GET /report`: the report over the API for auditors only (any other approver is refused 403, by token
or by the page's session), over a history made through the real workflow."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential
from tests.support.approvers import bearer, credentials
from tests.support.review_history import REVIEWERS, make_history


@pytest.fixture
def approvers() -> dict[str, ApproverCredential]:
    return credentials(REVIEWERS)


def test_an_auditor_reads_the_report_with_its_candidate_and_flag(client: TestClient, runtime: Runtime):
    make_history(runtime)
    answer = client.get("/report?since=1d&threshold=80%25&min_requests=4", headers=bearer("audrey"))
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert (report["decisions"], report["escalations"], report["requests"]) == (14, 11, 11)
    assert [c["policy"] for c in report["candidates"]] == ["protect-production-instances"]
    assert report["flagged_reviewers"] == ["erin"]
    assert report["policy_revision"] == runtime.engine.status.revision
    assert 'unless {' in report["candidates"][0]["suggestion"]


@pytest.mark.parametrize("who", ["erin", "fran"])
def test_an_approver_without_the_auditor_role_is_refused(client: TestClient, who: str):
    answer = client.get("/report", headers=bearer(who))
    assert answer.status_code == 403
    assert answer.json()["detail"] == f"the report is for approvers holding the auditor role (auditor); {who} does not"


def test_the_page_s_session_is_refused_too_unless_it_is_an_auditor_s(client: TestClient):
    assert client.post("/session", json={"token": "erin-token"}).status_code in (200, 201)
    assert client.get("/session").json()["auditor"] is False
    assert client.get("/report").status_code == 403
    assert client.post("/session", json={"token": "audrey-token"}).status_code in (200, 201)
    assert client.get("/session").json()["auditor"] is True
    assert client.get("/report").status_code == 200


def test_without_credentials_the_report_asks_for_them(client: TestClient):
    assert client.get("/report").status_code == 401


@pytest.mark.parametrize("query, message", [
    ("since=a%20week", "since 'a week'"), ("threshold=2", "threshold '2' is outside (0, 1]"),
])
def test_a_bad_window_or_threshold_is_refused_saying_what_to_write(client: TestClient, query: str, message: str):
    answer = client.get(f"/report?{query}", headers=bearer("audrey"))
    assert answer.status_code == 422 and message in answer.json()["detail"]
