"""Checking an MCP server's whole (not streamed) answer before the agent gets it.

The answer's content coding is decoded within a cap (`proxy.calls.decoding`), its JSON read, its tool lists
filtered and cedargate's own answers for refused messages added. All of it is plain work on bytes,
which the enforcer runs off the event loop for a large or encoded answer, or one that may carry a tool
list, so one such answer does not hold up every other call; a small answer in no coding that names no
`tools` (most tool results) is checked on the loop, saving the hand-off to a thread and back
(`read_on_loop`).
What is checked is what the agent gets: an encoded answer reaches it decoded, so no client reads
the bytes otherwise than cedargate did.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from proxy.calls.decoding import decode_bounded
from proxy.calls.mcp.sse import DEFAULT_MAX_EVENT, MAY_LIST_TOOLS, SseRewriter, read_json

DEFAULT_MAX_ANSWER = 16 * 1024 * 1024
# The largest answer in no content coding checked on the event loop, if it carries no tool list (the mapping
# reads request bodies up to 64 KiB on the loop too). No figure here: the A/B of d016d2c measured tool
# results (tools/call) only. A tool list is never read on the loop, whatever its size: filtering it asks
# the policy once per tool name, and 64 KiB hold thousands of names the server chooses (review finding 1
# of 2026-12-02: 80-220 ms of the loop's CPU per such answer).
READ_ON_LOOP_BYTES = 64 * 1024


@dataclass(frozen=True)
class CheckedAnswer:
    """What to send the agent: the server's answer as it came (`body` None), another body for it
    (unencoded), or only cedargate's own answers (`own_answers`, when the server sent no body)."""

    body: bytes | None = None
    own_answers: tuple[dict[str, Any], ...] = ()


def read_on_loop(raw: bytes, encoding: str) -> bool:
    """Whether an answer is checked on the event loop: in no content coding (what is read is what came,
    never a decoder's output), at most READ_ON_LOOP_BYTES long, and with nothing in it that may be a tool
    list (filtering one costs a policy question per tool; a scan of the bytes, not of the parsed answer,
    so an escape sends the answer to the thread). What is refused is the same either way."""
    return (encoding == "identity" and len(raw) <= READ_ON_LOOP_BYTES
            and not any(marker in raw for marker in MAY_LIST_TOOLS))


def check_answer(raw: bytes, encoding: str, media: str, status: int, rewrite: Callable[[Any], Any | None],
                 own_answers: Iterable[dict[str, Any]] = (), requests: Iterable[Any] = (), *,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER,
                 max_event_bytes: int = DEFAULT_MAX_EVENT) -> CheckedAnswer:
    """Check a whole MCP answer: `raw` as the server sent it under Content-Encoding `encoding`.

    Raises AnswerTooLarge (decoded, it passes `max_answer_bytes`) and ValueError (it does not decode, or
    a success cedargate cannot read as JSON nested at most MAX_ANSWER_DEPTH deep); the caller refuses the
    answer for both.
    """
    own_answers = tuple(own_answers)
    body = decode_bounded(raw, encoding, max_answer_bytes)
    decoded = body if encoding != "identity" else None
    if media == "text/event-stream":  # encoded, or it would have been streamed
        rewriter = SseRewriter(rewrite, own_answers, max_event_bytes=max_event_bytes, requests=requests)
        rewritten = rewriter.feed(body) + rewriter.feed(b"") if body else rewriter.feed(b"")
        return CheckedAnswer(rewritten if rewritten != body or decoded is not None else None)
    if not body.strip():
        # e.g. 202 for the forwarded notifications: the refused requests still need their answers.
        return CheckedAnswer(own_answers=own_answers) if own_answers else CheckedAnswer(decoded)
    try:
        answer = read_json(body)
    except ValueError as exc:
        if 200 <= status < 300:
            raise ValueError(f"a success the agent's client may read, but cedargate cannot read as "
                             f"UTF-8 JSON: {exc}") from None
        return CheckedAnswer(decoded)  # an error page: nothing in it for the client to act on
    filtered = rewrite(answer)
    answer = filtered if filtered is not None else answer
    if own_answers:
        answer = (answer if isinstance(answer, list) else [answer]) + list(own_answers)
    if filtered is not None or own_answers:
        return CheckedAnswer(json.dumps(answer).encode())
    return CheckedAnswer(decoded)
