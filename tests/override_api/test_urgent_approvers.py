"""An approver's change through the API goes ahead of the proxy's calls on the event loop, once the approver
is known (`proxy.oversight.urgency`): its request's context is marked. A read (the inbox's polling), a request
nobody authenticated, and a change refused for its session's CSRF token are not marked."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_override_routes import ROLES, escalated_stop, volume_deletion
from test_review_sessions import sign_in

from override_api.main import create_app
from proxy.oversight.urgency import URGENT
from proxy.runtime import Runtime
from proxy.settings.config import ApproverCredential
from tests.support.approvers import credentials


@pytest.fixture
def approvers() -> dict[str, ApproverCredential]:
    return credentials(ROLES)


class Observed:
    """The real app, noting for each request whether its context ended up marked urgent (read in the
    request's own task, after the app returned: what the dependency set there is seen here)."""

    def __init__(self, app: Any) -> None:
        self.app, self.state, self.seen = app, app.state, []

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http":
            mark = URGENT.get()
            self.seen.append((scope["method"], scope["path"], mark is not None and mark.active))


@pytest.fixture
def observed(runtime: Runtime):
    app = Observed(create_app(runtime))
    with TestClient(app) as client:
        yield client, app.seen


ERIN = {"Authorization": "Bearer erin-token"}
FROM_THE_PAGE = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}


def test_an_approvers_change_is_marked_with_a_token_or_a_session(observed, runtime: Runtime):
    client, seen = observed
    stop, volume = escalated_stop(runtime), volume_deletion(runtime)
    assert client.post(f"/overrides/{stop}/approve", json={"reason": "checked"}, headers=ERIN).status_code == 200
    csrf = sign_in(client, "sam").json()["csrf_token"]
    voted = client.post(f"/overrides/{volume}/approve", json={"reason": "backed up"},
                        headers={"X-CSRF-Token": csrf, **FROM_THE_PAGE})
    assert voted.status_code == 200, voted.text
    assert [s for s in seen if s[1] != "/session"] == [
        ("POST", f"/overrides/{stop}/approve", True), ("POST", f"/overrides/{volume}/approve", True)]


def test_reads_unknown_callers_and_refused_changes_are_not_marked(observed, runtime: Runtime):
    client, seen = observed
    stop = escalated_stop(runtime)
    assert client.get("/overrides", headers=ERIN).status_code == 200
    assert client.post(f"/overrides/{stop}/approve", json={"reason": "x"},
                       headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    assert sign_in(client).status_code == 200
    assert client.get("/overrides").status_code == 200
    assert client.post(f"/overrides/{stop}/approve", json={"reason": "x"}, headers=FROM_THE_PAGE).status_code == 403
    assert [s for s in seen if s[1] != "/session"] == [
        ("GET", "/overrides", False), ("POST", f"/overrides/{stop}/approve", False),
        ("GET", "/overrides", False), ("POST", f"/overrides/{stop}/approve", False)]
