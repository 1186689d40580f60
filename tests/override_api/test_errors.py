"""The override API answers its errors as problem+json: `about:blank`, titled by the status (RFC 9457)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from override_api.main import create_app
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential, Settings


@pytest.fixture
def client(tmp_path: Path, policy_dir: Path) -> Iterator[TestClient]:
    erin = ApproverCredential(token_sha256=hashlib.sha256(b"erin-token").hexdigest(), roles=("security",))
    settings = Settings(policy_dir=policy_dir, state_dir=tmp_path / "state", policy_reload_interval=0,
                        approvers={"erin": erin})
    runtime = Runtime.start(settings)
    with TestClient(create_app(runtime)) as test_client:
        yield test_client
    runtime.close()


ERIN = {"Authorization": "Bearer erin-token"}


def test_an_unknown_token_is_a_401_problem(client: TestClient):
    response = client.get("/overrides", headers={"Authorization": "Bearer nobody"})
    assert response.status_code == 401 and response.headers["content-type"] == "application/problem+json"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json() == {"type": "about:blank", "title": "Unauthorized", "status": 401,
                               "detail": "unknown approver token"}


def test_an_unknown_request_is_a_404_problem(client: TestClient):
    missing = uuid.uuid4()
    response = client.get(f"/overrides/{missing}", headers=ERIN)
    assert response.json() == {"type": "about:blank", "title": "Not Found", "status": 404,
                               "detail": f"no override request {missing}"}


def test_an_invalid_request_is_a_422_problem_naming_its_field(client: TestClient):
    response = client.get("/overrides", params={"limit": "many"}, headers=ERIN)
    body = response.json()
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
    assert (body["type"], body["title"], body["status"]) == ("about:blank", "Request is not valid", 422)
    assert body["errors"][0]["field"] == "query.limit" and body["detail"].startswith("query.limit: ")
