"""The enforcer: every intercepted request is decided by the cedargate core before it may go upstream.

Runs inside `cedargate run`, or alone under stock mitmproxy, composed as `cedargate run` composes it
(`proxy.cli.standalone`: the override API too, cedargate's state directory, loopback):
    mitmdump -s addons/enforcer.py --set cedargate_policy_dir=policies/ --set cedargate_config=cedargate.yaml
Allowed calls pass unchanged; refused ones get the verdict's problem+json. An escalatable denial is
held (the hook awaits the core's `Oversight`) until a human decides or the hold ends; a refused
held flow gets a response, never `flow.kill()` (mitmproxy issue 8045: the client would hang).
Record before forward: a call goes upstream only once its decision row is committed (a held call's
is queued when the hold starts), so a crash at any moment leaves no forwarded call off the record;
the upstream's status, the duration or the failure are added when known (`Gate.outcome`). A call
whose decision the store cannot take is refused with 503 store-unavailable.

A forwarded call whose upstream fails it (no connection, TLS it cannot verify, a connection lost, no
answer in time: see `addons.upstream_deadline`) gets problem+json saying what failed and whether the
call may have run (`proxy.decision.upstream`), in place of mitmproxy's HTML error page (`addons.error_pages`),
and the record keeps the failure. A call released under an override grant that never reached its upstream
gets the grant back, and its answer says so (`Oversight.upstream_failed`).

On an MCP endpoint (see `proxy.calls.mcp`) a batch is decided message by message, a refused request is
answered in JSON-RPC, and the server's answers are read before the agent gets them: tool lists are
filtered (event streams as they stream) and an answer cedargate cannot read is not passed on. One
event may hold `max_mcp_event_bytes` (past it, the stream ends with a JSON-RPC error); a whole answer
is decoded within `max_mcp_answer_bytes` (past it, a 502 problem). A whole answer is read off the event
loop unless small, in no content coding and without a tool list; so is an event (`addons.event_streams`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Sequence
from concurrent.futures import Future

from mitmproxy import ctx, exceptions, http

from addons import error_pages, event_streams
from addons.agent_auth import AGENT, proxy_auth_required
from addons.event_streams import ChunkToRead
from addons.options import RELEVANT, add_options, settings_from_options
from addons.upstream_deadline import DEADLINE_MISSED
from proxy.calls.decoding import ENCODINGS, AnswerTooLarge
from proxy.calls.mapping import FRAMING_HEADERS, Call, plain_utf8
from proxy.calls.mcp.answers import check_answer, read_on_loop
from proxy.calls.mcp.jsonrpc import Exchange
from proxy.calls.mcp.sse import SseRewriter, unreadable_problem
from proxy.calls.mcp.tools import filter_tool_list
from proxy.calls.tunnels import authority_of
from proxy.decision.decisions import Answer, Decision, decide_call
from proxy.decision.gate import Outcome, Verdict
from proxy.decision.upstream import CONNECT_TIMEOUT_MESSAGE, OWN_API_MESSAGE, classify
from proxy.oversight.changes import CHANGED_HEADER, changed_names, mark_changed
from proxy.oversight.held_calls import requested_wait
from proxy.record.store import RECORD_TIMEOUT
from proxy.runtime import Runtime
from proxy.vocabulary.printable import printable
from proxy.vocabulary.problems import MEDIA_TYPE, Problem, problem_document

log = logging.getLogger(__name__)

VERDICTS = "cedargate.verdicts"  # recorded and forwarded: their outcome is added when the upstream answers or fails
MCP = "cedargate.mcp"
MCP_CALL = "cedargate.mcp_call"  # the forwarded MCP call as decided: whose answer, from which endpoint
RELEASED = "cedargate.released"  # decision id -> the override it was released under, should the call not go
CHANGED = "cedargate.changed"  # decision id -> (changes, body) of a call released with a reviewer's changes
CHANGED_IDS = "cedargate.changed_ids"  # JSON-RPC id (JSON text) -> changes, for the answer's _meta


class Enforcer:
    def __init__(self, runtime: Runtime | None = None) -> None:
        self._given = runtime is not None
        self.runtime = runtime
        self._running = False

    def load(self, loader) -> None:
        add_options(loader)
        error_pages.install()
        event_streams.install()

    def configure(self, updated: set[str]) -> None:
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            # A streamed body goes upstream before the request hook can decide on the call.
            raise exceptions.OptionsError("cedargate decides on whole requests: unset stream_large_bodies")
        if self._given or (self.runtime and not RELEVANT & updated):
            return
        settings = settings_from_options()
        try:
            runtime = Runtime.start(settings)
        except Exception as exc:
            raise exceptions.OptionsError(f"cedargate cannot start: {exc}") from exc
        if self.runtime:
            self.runtime.close()
        self.runtime = runtime
        if self._running:
            runtime.jobs.start()

    def running(self) -> None:
        # Under stock mitmproxy too: no raw TCP relayed undecided through a tunnel, and no upstream
        # contacted before a call is decided.
        ctx.options.update(rawtcp=False, connection_strategy="lazy")
        self._running = True
        # Its own core: it starts the core's jobs (`cedargate run` starts them for the core it hands over).
        if self.runtime and not self._given:
            self.runtime.jobs.start()

    def _core(self) -> Runtime:
        """The core deciding calls: given, or started by `configure` (which mitmproxy calls before any
        other hook). Without it, a hook that needs it raises: `request` then answers the call 500."""
        if self.runtime is None:
            raise RuntimeError("the enforcer has no policies loaded")
        return self.runtime

    def _shown(self, url: str) -> str:
        """A URL for the log: query secrets redacted, terminal escapes made visible."""
        return self.runtime.gate.shown_url(url) if self.runtime else printable(url)

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
            infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(host, port),
                                           self.runtime.settings.upstream_connect_timeout)
        except TimeoutError:  # (an OSError: caught first) the lookup outlasted the connect timeout
            data.server.error = CONNECT_TIMEOUT_MESSAGE
            return
        except OSError:
            return  # unresolvable: the connection will fail on its own
        # An IP address, as a string: a lookup by host name gives AF_INET and AF_INET6 socket addresses only.
        if gate.reaches_own_api({str(info[4][0]) for info in infos}, port):
            data.server.error = OWN_API_MESSAGE

    def tcp_start(self, flow) -> None:
        log.warning("refused a raw TCP stream from %s: cedargate forwards only decided HTTP calls",
                    flow.client_conn.peername)
        flow.kill()

    def udp_start(self, flow) -> None:
        flow.kill()

    def dns_request(self, flow) -> None:
        flow.kill()

    def done(self) -> None:
        if self.runtime and not self._given:
            self.runtime.close()  # stops its jobs too

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        try:
            await self._enforce(flow)
        except Exception:
            # mitmproxy forwards a flow whose hook raised; cedargate must refuse it instead.
            log.exception("enforcement failed for %s", self._shown(flow.request.pretty_url))
            flow.response = http.Response.make(500, json.dumps(problem_document(Problem.INTERNAL_ERROR)),
                                               {"Content-Type": MEDIA_TYPE})

    async def _enforce(self, flow: http.HTTPFlow) -> None:
        agent = flow.metadata.get(AGENT)
        if not agent:  # only reachable if authentication did not run; never forward unattributed calls
            flow.response = proxy_auth_required("missing")
            return
        self._core()  # refused before the call is read, if there are no policies to decide it
        frame_body(flow.request)
        call = call_of(flow, agent)
        send_origin_form(flow.request)  # what goes upstream names the host decided on, and only that one
        decision = await self._decide(call)
        if decision.batch:
            answer, committed = await self._settle_batch(flow, decision)
        else:
            verdict = decision.verdicts[0]
            committed = self._record_first([verdict])
            answer = decision.answer([await self._decided(flow, verdict)])
            if answer.refusal is not None:
                self._refused(answer.refusal, recorded=bool(committed))
        if answer.refusal is not None:
            flow.response = (rpc_response(list(answer.rpc), answer.batch, answer.refusal) if answer.rpc
                             else refusal(answer.refusal))
            return
        if not await self._on_record(flow, answer.forwarded, committed):
            return
        flow.metadata[VERDICTS] = list(answer.forwarded)
        changed = flow.metadata.get(CHANGED, {})
        if changed:
            # Released with a reviewer's changes: the changed call goes (its Content-Length set anew).
            answer = answer.with_changes({decision_id: body for decision_id, (_, body) in changed.items()})
            if answer.exchange is not None:
                flow.metadata[CHANGED_IDS] = {
                    json.dumps(message.id): changed[verdict.decision_id][0]
                    for message, verdict in zip(answer.exchange.messages, answer.forwarded, strict=True)
                    if verdict.decision_id in changed}
        if answer.body is not None:
            flow.request.set_content(answer.body)
        self._prepare_mcp(flow, call, answer.exchange)

    def _record_first(self, verdicts: Sequence[Verdict]) -> dict[str, Future[None]]:
        """Record the verdicts whose calls may go upstream or be held, before either happens: an allowed
        call goes only once its row is committed (`_on_record`), and a held call's row is queued before
        its override request is opened (the recorder commits in queue order). Refusals are recorded
        when final (`_refused`)."""
        gate = self._core().gate
        return {verdict.decision_id: gate.record(verdict) for verdict in verdicts
                if verdict.outcome in (Outcome.ALLOW, Outcome.ESCALATE)}

    async def _on_record(self, flow: http.HTTPFlow, forwarded: Sequence[Verdict],
                         committed: dict[str, Future[None]]) -> bool:
        """Wait until the record holds every verdict about to be forwarded; if it cannot take them,
        refuse the call with 503 store-unavailable (the record says it was not forwarded)."""
        waits = [committed[v.decision_id] for v in forwarded if not committed[v.decision_id].done()]
        try:
            if waits:
                await all_done(waits, RECORD_TIMEOUT)
            for verdict in forwarded:
                committed[verdict.decision_id].result(0)  # raises what failed it
        except Exception as exc:  # the store failing (StoreUnavailable), or too slow: never forward unrecorded
            runtime = self._core()
            refused = runtime.gate.store_unavailable(forwarded[0])
            log.warning("refused %s %s: its decision could not be recorded (%s)", printable(flow.request.method),
                        self._shown(flow.request.pretty_url), type(exc).__name__)
            for verdict in forwarded:
                runtime.gate.outcome(verdict, refused=refused)
            # A call released under a grant and not forwarded after all keeps its grant for the retry.
            override_id = flow.metadata.get(RELEASED, {}).get(forwarded[0].decision_id)
            if override_id is not None:
                refused = await asyncio.to_thread(runtime.oversight.not_forwarded, refused, override_id,
                                                  {"kind": "store-unavailable", "message": type(exc).__name__})
            flow.response = refusal(refused)
            return False
        return True

    async def _decide(self, call: Call) -> Decision:
        gate = self._core().gate
        if len(call.body) > gate.mapping.max_body_bytes:
            # A large body (a form or multipart upload read for `_method`, say) is read in a worker
            # thread: one agent's upload must not hold up every other call on the event loop.
            return await asyncio.to_thread(decide_call, gate, call)
        return decide_call(gate, call)

    async def _decided(self, flow: http.HTTPFlow, verdict: Verdict, wait: float | None = None) -> Verdict | None:
        """None when the call may go upstream (allowed, or granted and released); else the refusal."""
        runtime = self._core()
        prefer, justification = header_values(flow.request.headers, b"prefer", b"x-agent-justification")
        if wait is None:
            wait = requested_wait(prefer, runtime.settings.hold_max_wait)
        resolution = await runtime.oversight.settle(
            verdict, wait, justification,
            client_alive=lambda: flow.live and not flow.error and flow.client_conn.connected,
        )
        if resolution.release:
            if resolution.override_id is not None:
                flow.metadata.setdefault(RELEASED, {})[verdict.decision_id] = resolution.override_id
            if resolution.changes is not None and resolution.body is not None:
                flow.metadata.setdefault(CHANGED, {})[verdict.decision_id] = (resolution.changes, resolution.body)
            return None  # allowed, or granted and released: forward the call (as a reviewer changed it), once
        verdict = resolution.verdict
        why = ", ".join(p.policy_id for p in verdict.determining)
        if not why and verdict.problem is not None:  # a refusal always has its problem
            why = verdict.problem.value
        log.info(
            "%s %s %s %s: %s", verdict.outcome.value, verdict.call.agent, printable(verdict.call.method),
            self._shown(verdict.call.url), why,
        )
        return verdict

    async def _settle_batch(self, flow: http.HTTPFlow,
                            decision: Decision) -> tuple[Answer, dict[str, Future[None]]]:
        """Settle each verdict of a JSON-RPC batch; a refused message is recorded at once.

        An escalated message is not held (the batch's other answers would wait on a human): its
        override request is opened at once, and its answer says to retry that call alone.
        """
        refusals: list[Verdict | None] = []
        committed: dict[str, Future[None]] = {}
        for verdict in decision.verdicts:
            committed.update(self._record_first([verdict]))
            refused = await self._decided(flow, verdict, wait=0.0)
            if refused is not None:
                self._refused(refused, recorded=verdict.decision_id in committed)
            refusals.append(refused)
        return decision.answer(refusals), committed

    def _prepare_mcp(self, flow: http.HTTPFlow, call: Call, exchange: Exchange | None) -> None:
        """Mark a forwarded MCP call, so the server's answer is read (only those: not cedargate's own)."""
        if exchange is not None:
            flow.metadata[MCP] = exchange
            flow.metadata[MCP_CALL] = call
            # The answers are read (tools/list is filtered) and, for an event stream, rewritten as they
            # stream: ask the server for them unencoded.
            flow.request.headers.pop("accept-encoding", None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        _say_changed(flow)
        if response.status_code == 101:
            # A protocol switch (WebSocket) would relay messages no policy decides; the mapping refuses
            # upgrade requests, and an upstream switching unasked is cut off here.
            log.warning("refused a protocol switch (101) from %s", self._shown(flow.request.pretty_url))
            flow.kill()
            return
        exchange: Exchange | None = flow.metadata.get(MCP)
        if exchange is None:
            return
        try:
            content_type, encoding = response.headers.get("content-type", ""), _encoding(response)
            if (encoding == "identity" and _media_of(content_type) == "text/event-stream"
                    and plain_utf8(content_type)):
                # An MCP server's stream may stay open for the session: pass events on as they come,
                # tool lists filtered, cedargate's answers for refused messages appended at the end.
                # (Any other answer is read whole, in `response`.)
                response.stream = SseRewriter(
                    self._tool_filter(flow), exchange.answers, requests=_requests(exchange),
                    max_event_bytes=self._core().settings.max_mcp_event_bytes,
                    on_refused=lambda: _end_upstream(flow),
                )
                response.headers.pop("content-length", None)  # the rewritten stream has another length
                if flow.request.http_version.startswith("HTTP/1"):
                    response.headers["transfer-encoding"] = "chunked"
                # Recorded now: the stream may stay open for the session (or the proxy stop first).
                self._finish_forwarded(flow, response.status_code)
        except Exception:
            log.exception("cannot prepare reading the MCP answer to %s", self._shown(flow.request.pretty_url))
            flow.kill()  # never pass an answer on unread

    async def read_off_loop(self, read: ChunkToRead) -> None:
        """A chunk of an MCP event stream that may complete a large event, or one listing tools, read in
        a worker thread, while the stream's layer waits for it (`addons.event_streams`)."""
        await asyncio.to_thread(read)

    def websocket_message(self, flow) -> None:
        # Never reached while 101 answers are cut off; should one get through, nothing is relayed.
        flow.websocket.messages[-1].drop()

    async def response(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            return
        if flow.metadata.get(DEADLINE_MISSED) and VERDICTS in flow.metadata:
            # An answer read until the connection closed, which cedargate closed at the deadline: cut short.
            await self._upstream_failed(flow, "the answer was cut short when the read timeout ran out")
            return
        upstream_status = flow.response.status_code
        exchange: Exchange | None = flow.metadata.get(MCP)
        if exchange is not None and not flow.response.stream:
            try:
                await self._rewrite_answer(flow, flow.response, exchange)
            except AnswerTooLarge as exc:
                log.warning("refused the MCP answer to %s: %s", flow.request.pretty_url, exc)
                flow.response = unreadable_answer(
                    f"{exc} (max_mcp_answer_bytes); cedargate checks an answer whole, so it was not "
                    "passed on. Ask the server for less (a smaller page or result), or ask the operator "
                    "to raise the cap"
                )
            except Exception:
                log.exception("cannot read the MCP answer to %s", self._shown(flow.request.pretty_url))
                flow.response = unreadable_answer()
        _say_changed(flow)
        self._finish_forwarded(flow, upstream_status)

    async def error(self, flow: http.HTTPFlow) -> None:
        if VERDICTS in flow.metadata:
            await self._upstream_failed(flow, flow.error.msg if flow.error else "")

    async def _upstream_failed(self, flow: http.HTTPFlow, message: str) -> None:
        """Record how a forwarded call failed, and answer the agent (`error_pages` sends the answer)."""
        verdicts = flow.metadata.pop(VERDICTS, None) or ()
        runtime = self._core()
        settings = runtime.settings
        # The call left cedargate once its upstream connection was up: mitmproxy sends it right then.
        sent = flow.server_conn.timestamp_tcp_setup is not None
        failure = classify(
            message, sent=sent, tls=flow.request.scheme == "https",
            timed_out=DEADLINE_MISSED in flow.metadata,
            timeout=settings.upstream_read_timeout if sent else settings.upstream_connect_timeout,
            # mitmproxy's words when the agent's side ended the exchange (HTTP/1, HTTP/2)
            client_gone=message.startswith("Client disconnected") or "reset by client" in message
            or not flow.client_conn.connected,
        )
        request = flow.request
        log.info("%s to %s:%s: %s", request.method, request.host, request.port, failure.recorded)
        for verdict in verdicts:
            runtime.gate.outcome(verdict, None, failure)
        released = flow.metadata.get(RELEASED, {})
        answers = []
        for verdict in verdicts:
            override_id = released.get(verdict.decision_id)
            # Released under a grant: one that never went gets it back (`Oversight.upstream_failed`).
            answers.append(failure.refusal(verdict) if override_id is None else await asyncio.to_thread(
                runtime.oversight.upstream_failed, verdict, override_id, failure))
        if verdicts and failure.answerable:
            flow.response = refusal(answers[0])

    async def _rewrite_answer(self, flow: http.HTTPFlow, response: http.Response, exchange: Exchange) -> None:
        """Filter the tool lists in a whole (not streamed) MCP answer and add cedargate's answers to it.

        Decoding, reading and rewriting a large or compressed answer run in a worker thread: it must not
        hold up the other calls on the event loop. A small one in no coding that may carry no tool list
        (filtering one asks the policy per tool name) is checked on the loop, saving the hand-off
        (`read_on_loop`). An answer cedargate changed or decoded goes to
        the agent unencoded: the bytes it checked.
        """
        content_type, encoding = response.headers.get("content-type", ""), _encoding(response)
        raw = response.raw_content or b""
        if encoding not in ANSWER_ENCODINGS or (raw and not plain_utf8(content_type)):
            raise ValueError(f"an answer cedargate may read otherwise than the client: "
                             f"{response.headers.get('content-type')!r}, {encoding!r}")
        settings = self._core().settings
        check = functools.partial(
            check_answer, raw, encoding, _media_of(content_type), response.status_code, self._tool_filter(flow),
            exchange.answers, _requests(exchange),
            max_answer_bytes=settings.max_mcp_answer_bytes, max_event_bytes=settings.max_mcp_event_bytes,
        )
        checked = check() if read_on_loop(raw, encoding) else await asyncio.to_thread(check)
        if checked.own_answers:
            flow.response = rpc_response(list(checked.own_answers), True, None)
        elif checked.body is not None:
            response.headers.pop("content-encoding", None)
            response.set_content(checked.body)

    def _tool_filter(self, flow: http.HTTPFlow):
        """What every MCP answer (or event) goes through: tool lists filtered, and a result answering a
        message a reviewer changed marked with `_meta["cedargate/changes"]`."""
        call: Call = flow.metadata[MCP_CALL]
        gate = self._core().gate
        changed = flow.metadata.get(CHANGED_IDS)

        def rewrite(answer):
            gate.observe_tools(call, answer)  # before filtering: the hints of every tool the server lists
            filtered = filter_tool_list(answer, lambda names: gate.visible_tools(call, names))
            if not changed:
                return filtered
            marked = mark_changed(answer if filtered is None else filtered, changed)
            return filtered if marked is None else marked

        return rewrite

    def _finish_forwarded(self, flow: http.HTTPFlow, status: int | None) -> None:
        """Add the upstream's status to the record of what was forwarded, once it answered."""
        for verdict in flow.metadata.pop(VERDICTS, None) or ():
            self._core().gate.outcome(verdict, status)

    def _refused(self, verdict: Verdict, *, recorded: bool) -> None:
        """Record a refusal: as the outcome of a verdict recorded before (a hold that ended refused),
        else as its row."""
        gate = self._core().gate
        if recorded:
            gate.outcome(verdict, refused=verdict)
        else:
            gate.finish(verdict, None)


async def all_done(futures: Sequence[Future[None]], timeout: float) -> None:
    """Wait until every one of `futures` (resolved by the recorder's thread) is done, or raise TimeoutError.

    The commit every forwarded call waits for, awaited with one loop future and one timer: wrapping each
    future for asyncio and gathering them under `wait_for` built four futures, a task and their callbacks
    per call. Whether each one succeeded is for the caller to read (`Future.result`).
    """
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    left = len(futures)

    def one_done() -> None:  # on the loop
        nonlocal left
        left -= 1
        if left == 0 and not waiter.done():
            waiter.set_result(None)

    def on_thread(_: Future[None]) -> None:  # on the recorder's thread (or this one, if already done)
        if not loop.is_closed():
            loop.call_soon_threadsafe(one_done)

    def timed_out() -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    for future in futures:
        future.add_done_callback(on_thread)
    timer = loop.call_later(timeout, timed_out)
    try:
        await waiter
    finally:
        timer.cancel()


def _say_changed(flow: http.HTTPFlow) -> None:
    """Tell the agent its call went as a reviewer changed it: `Cedargate-Changed` names the fields."""
    changed = flow.metadata.get(CHANGED)
    if changed and flow.response is not None:
        flow.response.headers[CHANGED_HEADER] = changed_names(changes for changes, _ in changed.values())


def call_of(flow: http.HTTPFlow, agent: str) -> Call:
    request = flow.request
    # Not urlsplit: it reads a leading "//" as a host, and raises on some paths.
    path, _, query = request.path.partition("?")
    # Inside a CONNECT tunnel mitmproxy knows the server's address before the call is decided (and
    # sets `host`, `port` to it); outside one it does not. The client's SNI names the tunnel's server
    # there, and the proxy itself when the client speaks TLS to the proxy (secure web proxy).
    in_tunnel = flow.server_conn.address is not None
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
        # Outside tunnels mitmproxy turns an HTTP/1 absolute-form target into origin-form before this.
        target_authority=(request.authority or None) if request.http_version.startswith("HTTP/1") else None,
        server_name=flow.client_conn.sni if in_tunnel and flow.client_conn.tls else None,
        headers=plain_headers(request.headers),
        trailers=tuple(request.trailers.keys()) if request.trailers else (),
        # The bytes the upstream will get: a Content-Encoding other than identity is refused by the
        # mapping, since decoders differ.
        body=request.raw_content or b"",
    )


def send_origin_form(request: http.Request) -> None:
    """Make the request go upstream as RFC 9112 section 3.2 asks of a proxy: in origin-form, with a Host
    naming the authority it was decided on.

    A server routes an absolute-form target by its authority (over Host), and a Host-less call
    (HTTP/1.0 allows one) to its default virtual host, whatever host the call was decided for.
    """
    if not request.http_version.startswith("HTTP/1"):
        if not request.host_header:  # HTTP/2 and 3 name it in :authority, made Host for an HTTP/1 upstream
            request.authority = authority_of(request.scheme, request.host, request.port)
        return
    authority = request.authority or authority_of(request.scheme, request.host, request.port)
    request.authority = ""
    if not any(name.lower() == b"host" for name, _ in request.headers.fields):
        request.headers.insert(0, "Host", authority)


def frame_body(request: http.Request) -> None:
    """Give an HTTP/2 or HTTP/3 body the Content-Length an HTTP/1.1 upstream needs to find its end.

    Those protocols may send a body without one, and mitmproxy passes the headers on to an HTTP/1.1
    upstream as they came: the upstream would read no body, and the body as the next request on the
    connection, which nobody decided. (Over HTTP/1.1 a body always comes with its framing.)
    """
    if request.is_http2 or request.is_http3:
        if request.raw_content and not FRAMING_HEADERS.intersection(k.lower() for k in request.headers):
            request.headers["content-length"] = str(len(request.raw_content))


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


def header_values(headers: http.Headers, *names: bytes) -> list[str | None]:
    """`headers.get(name)` for each of `names` (lower-case), in one pass over the raw fields: the values of a
    name repeated (in any case) joined with ", ", None for a name not sent. Each `get` of `http.Headers`
    scans and lower-cases every field."""
    found: dict[bytes, list[bytes]] = {}
    for raw_name, raw_value in headers.fields:
        key = raw_name.lower()
        if key in names:
            found.setdefault(key, []).append(raw_value)
    return [", ".join(value.decode("utf-8", "surrogateescape") for value in found[name]) if name in found
            else None for name in names]


# Encodings an MCP client decodes as cedargate does; others (mitmproxy even decodes "base64") are refused.
ANSWER_ENCODINGS = frozenset(ENCODINGS)


def unreadable_answer(detail: str = "") -> http.Response:
    return http.Response.make(502, json.dumps(unreadable_problem(detail)).encode(),
                              {"Content-Type": "application/problem+json"})


def _requests(exchange: Exchange) -> list:
    """The ids of the forwarded requests, which the server's answer owes an answer to."""
    return [message.id for message in exchange.messages if message.kind == "request"]


def _end_upstream(flow: http.HTTPFlow) -> None:
    """End a refused event stream: close the connection to the server, so nothing more is read from it.

    mitmproxy has no hook to end a response mid-stream; closing the server connection ends the
    exchange (the agent's connection or HTTP/2 stream is then closed after the last event sent).
    Under a master without a proxy server (tests), the rest of the stream is only dropped.
    """
    master = getattr(ctx, "master", None)
    server = master.addons.get("proxyserver") if master else None
    handler = getattr(server, "connections", {}).get(flow.client_conn.id) if server else None
    if handler is None:
        return

    def close() -> None:
        if flow.server_conn in handler.transports:
            handler.close_connection(flow.server_conn)

    # Not from inside the stream callable: mitmproxy is still handling the event that called it.
    asyncio.get_running_loop().call_soon(close)


def _encoding(message: http.Message) -> str:
    return message.headers.get("content-encoding", "identity").strip().lower() or "identity"


def _media_of(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def rpc_response(answers: list[dict], batch: bool, verdict: Verdict | None) -> http.Response:
    """cedargate's JSON-RPC answer, as an MCP server would give it (HTTP 200, application/json)."""
    headers = {"Content-Type": "application/json"}
    if verdict is not None:
        headers["X-Cedargate-Decision"] = verdict.decision_id
    return http.Response.make(200, json.dumps(answers if batch else answers[0]).encode(), headers)


def refusal(verdict: Verdict) -> http.Response:
    headers = {"Content-Type": "application/problem+json", "X-Cedargate-Decision": verdict.decision_id}
    headers.update(verdict.extra_headers)
    return http.Response.make(verdict.status, verdict.problem_json(), headers)


if __name__.startswith("__mitmproxy_script__"):
    # Under `mitmdump -s addons/enforcer.py`: the program `cedargate run` composes, from mitmproxy options.
    from proxy.cli.standalone import standalone_addons

    addons = standalone_addons()
