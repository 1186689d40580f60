"""The enforcer: every intercepted request is decided by the cedargate core before it may go upstream.

Runs inside `cedargate run`, or alone under stock mitmproxy:
    mitmdump -s addons/enforcer.py --set policy_dir=policies/ --set cedargate_config=cedargate.yaml
Allowed calls pass unchanged; refused ones get the verdict's problem+json. An escalatable denial is
held (the hook awaits the core's `Oversight`) until a human decides or the hold ends; a refused
held flow gets a response, never `flow.kill()` (mitmproxy issue 8045: the client would hang). The
verdict is recorded once the upstream answered (or failed), with the upstream status and duration.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from mitmproxy import ctx, exceptions, http

from addons.agent_auth import AGENT, AgentAuth, proxy_auth_required
from addons.options import add_options, settings_from_options
from proxy.gate import Outcome, Verdict
from proxy.mapping import Call
from proxy.oversight import requested_wait
from proxy.runtime import Runtime

log = logging.getLogger(__name__)

VERDICT = "cedargate.verdict"
RECORDED = "cedargate.recorded"


class Enforcer:
    def __init__(self, runtime: Runtime | None = None) -> None:
        self._given = runtime is not None
        self.runtime = runtime
        self._sweeper: asyncio.Task | None = None

    def load(self, loader) -> None:
        add_options(loader)

    def configure(self, updated: set[str]) -> None:
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            # A streamed body goes upstream before the request hook can decide on the call.
            raise exceptions.OptionsError("cedargate decides on whole requests: unset stream_large_bodies")
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

    def running(self) -> None:
        # Under stock mitmproxy too: no raw TCP relayed undecided through a tunnel, and no upstream
        # contacted before a call is decided.
        ctx.options.update(rawtcp=False, connection_strategy="lazy")
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        flow.request.stream = False  # whatever set it: the call is decided on its whole body

    async def server_connect(self, data) -> None:
        """Refuse a connection that resolves to cedargate's own API, whatever name the agent used."""
        if self.runtime is None or data.server.error:
            return
        host, port = data.server.address
        gate = self.runtime.gate
        if not any(api_port == port for _, api_port in gate.protected):
            return
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port)
        except OSError:
            return  # unresolvable: the connection will fail on its own
        if gate.reaches_own_api({info[4][0] for info in infos}, port):
            data.server.error = "cedargate refuses connections to its own API"

    def tcp_start(self, flow) -> None:
        log.warning("refused a raw TCP stream from %s: cedargate forwards only decided HTTP calls",
                    flow.client_conn.peername)
        flow.kill()

    def udp_start(self, flow) -> None:
        flow.kill()

    def dns_request(self, flow) -> None:
        flow.kill()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await asyncio.to_thread(self.runtime.oversight.sweep)
            except Exception:  # a store hiccup must not end expiry for good
                log.exception("override expiry sweep failed")

    def done(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        if self.runtime and not self._given:
            self.runtime.close()

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        try:
            await self._enforce(flow)
        except Exception:
            # mitmproxy forwards a flow whose hook raised; cedargate must refuse it instead.
            log.exception("enforcement failed for %s", flow.request.pretty_url)
            flow.response = http.Response.make(
                500, b'{"type": "urn:cedargate:problem:internal-error", "title": "cedargate failed to decide '
                b'this call; it was not forwarded", "status": 500}', {"Content-Type": "application/problem+json"},
            )

    async def _enforce(self, flow: http.HTTPFlow) -> None:
        agent = flow.metadata.get(AGENT)
        if not agent:  # only reachable if authentication did not run; never forward unattributed calls
            flow.response = proxy_auth_required("missing")
            return
        if self.runtime is None:
            raise RuntimeError("the enforcer has no policies loaded")
        verdict = self.runtime.gate.decide(call_of(flow, agent))
        flow.metadata[VERDICT] = verdict
        if verdict.outcome is Outcome.ESCALATE:
            verdict = await self._hold(flow, verdict)
            if verdict is None:
                return  # granted and released: forward the original call, once
        if not verdict.allowed:
            log.info(
                "%s %s %s %s: %s", verdict.outcome.value, agent, verdict.call.method, verdict.call.url,
                ", ".join(p.policy_id for p in verdict.determining) or verdict.problem.value,
            )
            flow.response = refusal(verdict)
            self._finish(flow, verdict, None)

    async def _hold(self, flow: http.HTTPFlow, verdict: Verdict) -> Verdict | None:
        """Hold an escalated call; None when it is released, else the refusal to answer with."""
        settings = self.runtime.settings
        wait = requested_wait(flow.request.headers.get("Prefer"), settings.hold_max_wait)
        try:
            resolution = await self.runtime.oversight.resolve(
                verdict, wait, flow.request.headers.get("X-Agent-Justification"),
                client_alive=lambda: flow.live and not flow.error and flow.client_conn.connected,
            )
        except Exception as exc:  # the override path failing must refuse, never release
            log.exception("override handling failed for %s", verdict.call.url)
            return replace(verdict, detail=f"{verdict.detail} (the override request could not be stored: {exc})")
        if resolution.release:
            return None
        return resolution.verdict

    def response(self, flow: http.HTTPFlow) -> None:
        verdict = flow.metadata.get(VERDICT)
        if verdict and flow.response:
            self._finish(flow, verdict, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        verdict = flow.metadata.get(VERDICT)
        if verdict:
            self._finish(flow, verdict, None)

    def _finish(self, flow: http.HTTPFlow, verdict: Verdict, status: int | None) -> None:
        if not flow.metadata.get(RECORDED) and self.runtime:
            flow.metadata[RECORDED] = True
            self.runtime.gate.finish(verdict, status)


def call_of(flow: http.HTTPFlow, agent: str) -> Call:
    request = flow.request
    # Not urlsplit: it reads a leading "//" as a host, and raises on some paths.
    path, _, query = request.path.partition("?")
    return Call(
        agent=agent,
        method=request.method,
        scheme=request.scheme,
        # The address mitmproxy will connect to, not the Host header an agent could set to anything.
        host=request.host,
        port=request.port,
        path=path,
        query=query,
        host_header=request.host_header,
        headers=plain_headers(request.headers),
        # Decoded (gzip etc.) so policies see the JSON the upstream will see; undecodable stays raw
        # and then fails JSON mapping, which refuses the call.
        body=request.get_content(strict=False) or b"",
    )


def plain_headers(headers: http.Headers) -> dict[str, str]:
    """The headers as a plain dict, as `http.Headers` reads them: each name as first spelled, the values
    of a repeated name (in any case) joined with ", ".

    One pass over the raw fields: through its Mapping interface, `http.Headers` scans every field again
    for each name read, which made a call's few header reads cost a third of its Cedar evaluation.
    """
    spelled: dict[bytes, str] = {}  # lower-cased raw name -> the name as first spelled
    plain: dict[str, str] = {}
    for raw_name, raw_value in headers.fields:
        value = raw_value.decode("utf-8", "surrogateescape")
        key = raw_name.lower()
        name = spelled.get(key)
        if name is None:
            name = spelled[key] = raw_name.decode("utf-8", "surrogateescape")
            plain[name] = value
        else:
            plain[name] += ", " + value
    return plain


def refusal(verdict: Verdict) -> http.Response:
    headers = {"Content-Type": "application/problem+json", "X-Cedargate-Decision": verdict.decision_id}
    headers.update(verdict.extra_headers)
    return http.Response.make(verdict.status, verdict.problem_json(), headers)


addons = [AgentAuth(), Enforcer()]
