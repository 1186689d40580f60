"""What an agent's JSON body can do to the review API and to approve with changes, through the real proxy.

JSON may carry a lone surrogate escape (`"\\ud83d"`): Python reads it as a str that UTF-8 cannot encode,
so answering it as JSON text with ensure_ascii=False fails; one such call made the reviewers' listing
answer 500 for every request. And parsing a body and writing it again changes values nobody changed: a
number rounds to a float (`1.00000000000000000001` becomes `1.0`, which a PostgreSQL numeric column
would store), one past a float's range becomes `Infinity` (not JSON). What reaches the upstream is the
call the reviewer saw, with only the values they changed rewritten.
"""

from __future__ import annotations

import ssl
from concurrent.futures import ThreadPoolExecutor

import httpx
from test_approve_with_changes import api, pending, refunds_gate  # noqa: F401  (refunds_gate: a fixture)

SENT = ('{"amount": 100, "currency": "EUR \\ud83d", "fx_rate": 1.00000000000000000001, "cap": 1e400, '
        '"note": "d\u00e9j\u00e0 vu"}').encode()


def test_a_lone_surrogate_is_shown_and_only_the_changed_value_is_rewritten(refunds_gate, upstream):  # noqa: F811
    url = f"http://localhost:{upstream.http_port}/v1/refunds/o-9"
    with ThreadPoolExecutor(1) as pool, httpx.Client(
            proxy=refunds_gate.proxy_url, verify=ssl.create_default_context(cafile=refunds_gate.ca_cert),
            timeout=60) as http:
        held = pool.submit(http.post, url, content=SENT, headers={"Content-Type": "application/json"})
        request = pending(refunds_gate, "erin")
        listed = api(refunds_gate, "GET", "/overrides", "erin")
        shown = api(refunds_gate, "GET", f"/overrides/{request['id']}", "erin")
        assert listed.status_code == 200, listed.text
        assert shown.status_code == 200, shown.text
        assert {"name": "currency", "type": "String", "value": "EUR \ud83d"} in shown.json()["editable_fields"]
        approved = api(refunds_gate, "POST", f"/overrides/{request['id']}/approve", "erin",
                       json={"reason": "half now", "changes": {"amount": 50}})
        assert approved.status_code == 200, approved.text
        response = held.result(timeout=30)
    assert response.status_code == 200, response.text
    [seen] = upstream.calls
    assert seen.body == SENT.replace(b'"amount": 100', b'"amount": 50')
