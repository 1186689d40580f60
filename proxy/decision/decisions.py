"""One pass down, one pass up: a call in, its complete `Decision` out, and what to answer once it is final.

`decide_call` is the one way a call gets decided, by the proxy and by `cedargate explain` alike. It reads
the call once (its MCP endpoint looked up, its JSON-RPC body parsed: `proxy.calls.mapping.read_call`),
decides it under one policy revision, and a JSON-RPC batch message by message. The adapter then settles
each verdict (an escalation is held or opened, a hard deny may spend an earlier grant: `proxy.oversight`)
and asks `Decision.answer` what to do: forward the call (a batch without its refused messages), or
answer for it with problem+json or, for a refused JSON-RPC request, the answer an MCP client shows its
model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from proxy.calls.mapping import Call, read_call, split_batch
from proxy.calls.mcp.jsonrpc import Exchange
from proxy.calls.mcp.refusals import refusal_answer
from proxy.decision.gate import Gate, Verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What the adapter does with a call whose verdicts are final.

    `refusal` None: the call goes upstream, with `body` in place of the agent's if set (a batch without
    its refused messages), `forwarded` recorded once the upstream answers, and `exchange` (on an MCP
    endpoint) what the server's answer is read against. Otherwise nothing goes upstream and the agent
    gets `rpc` (JSON-RPC answers: a batch if `batch`, else one) or, when there are none, `refusal`'s
    problem+json; either way under `refusal`'s decision id.
    """

    forwarded: tuple[Verdict, ...] = ()
    exchange: Exchange | None = None
    body: bytes | None = None
    refusal: Verdict | None = None
    rpc: tuple[dict[str, Any], ...] = ()
    batch: bool = False

    def with_changes(self, changed: Mapping[str, bytes]) -> Answer:
        """The answer forwarding, for each forwarded verdict in `changed` (by decision id), that body in place
        of its call's (or of its message, in a batch): a reviewer approved it with changes."""
        if not any(v.decision_id in changed for v in self.forwarded):
            return self
        if self.exchange is None or not self.exchange.batch:
            return replace(self, body=changed[self.forwarded[0].decision_id])
        messages = [json.loads(changed[v.decision_id]) if v.decision_id in changed else m.raw
                    for m, v in zip(self.exchange.messages, self.forwarded, strict=True)]
        return replace(self, body=json.dumps(messages).encode())


@dataclass(frozen=True)
class Decision:
    """A call decided: its verdicts (one per message of a JSON-RPC batch, else one; each escalation is
    the verdict's), and the MCP exchange it is (None when the call is not addressed to an MCP endpoint).
    """

    call: Call
    verdicts: tuple[Verdict, ...]
    exchange: Exchange | None = None

    @property
    def batch(self) -> bool:
        return self.exchange is not None and self.exchange.batch

    def answer(self, refusals: Sequence[Verdict | None]) -> Answer:
        """What to do once every verdict is final: `refusals[i]` is None when verdict i's call may go
        upstream (allowed, or granted and released), else the refusal it ended in."""
        if len(refusals) != len(self.verdicts):
            raise ValueError(f"{len(refusals)} final verdicts for {len(self.verdicts)} decided")
        if not self.batch:
            refused = refusals[0]
            if refused is None:
                return Answer(forwarded=self.verdicts, exchange=self.exchange)
            message = self.exchange.messages[0] if self.exchange and self.exchange.messages else None
            if message is not None and message.kind == "request":
                # An MCP client shows a JSON-RPC answer to its model; an HTTP error would make it raise.
                return Answer(refusal=refused, rpc=(refusal_answer(refused.problem_body(), message),))
            return Answer(refusal=refused)
        assert self.exchange is not None
        forwarded, answers, refused_verdicts = [], [], []
        for message, verdict, refused in zip(self.exchange.messages, self.verdicts, refusals, strict=True):
            if refused is None:
                forwarded.append((message, verdict))
                continue
            refused_verdicts.append(refused)
            if message.kind == "request":
                answers.append(refusal_answer(refused.problem_body(), message))
        if not forwarded:
            return Answer(refusal=refused_verdicts[0], rpc=tuple(answers), batch=True)
        messages = tuple(message for message, _ in forwarded)
        return Answer(
            forwarded=tuple(verdict for _, verdict in forwarded),
            exchange=replace(self.exchange, messages=messages, answers=tuple(answers)),
            body=json.dumps([m.raw for m in messages]).encode() if refused_verdicts else None,
        )


def decide_call(gate: Gate, call: Call) -> Decision:
    """Decide `call` in one pass, under one policy revision: a JSON-RPC batch message by message.

    Never raises: as `Gate.decide`, anything unforeseen refuses the call.
    """
    snapshot = gate.engine.snapshot  # the manifest and the policies of one revision
    try:
        reading = read_call(call, gate.mapping, snapshot.bundle.manifest)
    except Exception:  # deciding the call reads it again, and refuses it saying why
        log.exception("reading a call failed")
        return Decision(call, (gate.decide(call, None, snapshot),))
    body = reading.body
    if body is not None and body.batch:
        parts = split_batch(call, reading, gate.mapping.max_body_bytes)
        verdicts = tuple(gate.decide(part, part_reading, snapshot) for part, part_reading in parts)
        return Decision(call, verdicts, Exchange(body.messages, True))
    exchange = None if reading.endpoint is None else Exchange(body.messages if body else (), False)
    return Decision(call, (gate.decide(call, reading, snapshot),), exchange)

