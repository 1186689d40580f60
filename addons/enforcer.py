"""The enforcer: every intercepted request is decided by the cedargate core before it may go upstream.

Runs inside `cedargate run`, or alone under stock mitmproxy:
    mitmdump -s addons/enforcer.py --set policy_dir=policies/ --set cedargate_config=cedargate.yaml
Allowed calls pass unchanged; refused ones get the verdict's problem+json. The verdict is recorded once
the upstream answered (or failed), so the record holds the upstream status and the duration.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from mitmproxy import exceptions, http

from addons.agent_auth import AGENT, AgentAuth
from addons.options import add_options, settings_from_options
from proxy.gate import Gate, Verdict
from proxy.mapping import Call
from proxy.runtime import Runtime

log = logging.getLogger(__name__)

VERDICT = "cedargate.verdict"
RECORDED = "cedargate.recorded"


class Enforcer:
    def __init__(self, runtime: Runtime | None = None) -> None:
        self._given = runtime is not None
        self.runtime = runtime

    @property
    def gate(self) -> Gate:
        assert self.runtime is not None, "the enforcer is not configured"
        return self.runtime.gate

    def load(self, loader) -> None:
        add_options(loader)

    def configure(self, updated: set[str]) -> None:
        relevant = {"cedargate_config", "policy_dir", "database_url"} & updated
        if self._given or (self.runtime and not relevant):
            return
        settings = settings_from_options()
        try:
            runtime = Runtime.start(settings)
        except Exception as exc:
            raise exceptions.OptionsError(f"cedargate cannot start: {exc}") from exc
        if self.runtime:
            self.runtime.close()
        self.runtime = runtime

    def done(self) -> None:
        if self.runtime and not self._given:
            self.runtime.close()

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        agent = flow.metadata.get(AGENT)
        if not agent:  # only reachable if authentication did not run; never forward unattributed calls
            flow.response = http.Response.make(407, b"proxy authentication required")
            return
        verdict = self.gate.decide(call_of(flow, agent))
        flow.metadata[VERDICT] = verdict
        if not verdict.allowed:
            log.info(
                "%s %s %s %s: %s", verdict.outcome.value, agent, verdict.call.method, verdict.call.url,
                ", ".join(p.policy_id for p in verdict.determining) or verdict.problem.value,
            )
            flow.response = refusal(verdict)
            self._finish(flow, verdict, None)

    def response(self, flow: http.HTTPFlow) -> None:
        verdict = flow.metadata.get(VERDICT)
        if verdict and flow.response:
            self._finish(flow, verdict, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        verdict = flow.metadata.get(VERDICT)
        if verdict:
            self._finish(flow, verdict, None)

    def _finish(self, flow: http.HTTPFlow, verdict: Verdict, status: int | None) -> None:
        if not flow.metadata.get(RECORDED):
            flow.metadata[RECORDED] = True
            self.gate.finish(verdict, status)


def call_of(flow: http.HTTPFlow, agent: str) -> Call:
    request = flow.request
    parts = urlsplit(request.path)
    return Call(
        agent=agent,
        method=request.method,
        scheme=request.scheme,
        # The address mitmproxy will connect to, not the Host header an agent could set to anything.
        host=request.host,
        port=request.port,
        path=parts.path or "/",
        query=parts.query,
        headers=request.headers,
        # Decoded (gzip etc.) so policies see the JSON the upstream will see; undecodable stays raw
        # and then fails JSON mapping, which refuses the call.
        body=request.get_content(strict=False) or b"",
    )


def refusal(verdict: Verdict) -> http.Response:
    headers = {"Content-Type": "application/problem+json", "X-Cedargate-Decision": verdict.decision_id}
    headers.update(verdict.extra_headers)
    return http.Response.make(verdict.status, verdict.problem_json(), headers)


addons = [AgentAuth(), Enforcer()]
