"""`GET /metrics` on the override API: Prometheus's text format, open by default, and a bearer token when
CEDARGATE_METRICS_TOKEN is set."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from override_api.main import create_app
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential
from tests.support.approvers import bearer, credentials


@pytest.fixture
def approvers() -> dict[str, ApproverCredential]:
    return credentials({"erin": ("engineering-manager",)})


def test_a_scrape_shows_every_override_status_and_the_live_revision(client: TestClient, runtime: Runtime) -> None:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    statuses = {s.labels["status"]: s.value for s in families["cedargate_override_requests"].samples}
    assert statuses["pending"] == 0 and {"granted", "denied", "expired", "released", "needs_info"} <= set(statuses)
    revision = runtime.engine.status.revision
    marked_live = [s.labels["revision"] for s in families["cedargate_policy_revision"].samples if s.value == 1]
    assert marked_live == [revision]  # only the live engine's; one before it in this process is no longer
    assert client.get("/status").json()["metrics"]["token_required"] is False


@pytest.fixture
def guarded(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("CEDARGATE_METRICS_TOKEN", "scrape-secret")
    with TestClient(create_app(runtime)) as test_client:
        yield test_client


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-secret"},
                                     bearer("erin"), {"Authorization": "Bearer scrape-secrét"}],
                         ids=["none", "wrong", "not-bearer", "an-approver's", "non-ascii"])
def test_with_a_token_set_a_scrape_without_it_is_refused(guarded: TestClient, headers: dict[str, str]) -> None:
    # Sent as Latin-1 bytes, as a client may: the comparison must refuse them, not fail on them.
    answer = guarded.get("/metrics", headers={k: v.encode("latin-1") for k, v in headers.items()})
    assert answer.status_code == 401
    assert "CEDARGATE_METRICS_TOKEN" in answer.json()["detail"]


def test_with_a_token_set_a_scrape_bearing_it_is_answered(guarded: TestClient) -> None:
    answer = guarded.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
    assert answer.status_code == 200 and "cedargate_decisions_total" in answer.text
    assert guarded.get("/status").json()["metrics"]["token_required"] is True
