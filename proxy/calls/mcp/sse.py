"""Reading a server's MCP answer, and rewriting its text/event-stream event by event."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate
from typing import Any

from proxy.calls.mcp.refusals import REFUSED_CODE
from proxy.vocabulary.problems import Problem, problem_document

log = logging.getLogger(__name__)

# The deepest nesting of arrays and objects read in an MCP answer or event. json.loads recurses once per
# level and stops at the interpreter's recursion limit less the frames already on the stack, so without a
# limit of its own an answer's verdict would depend on where it was read: some levels fewer on the event
# loop than in a worker thread (review finding 4 of 2026-12-02). 256 is twice serde_json's default, and
# far enough below Python's 1,000 that neither reading an answer within it nor writing it back runs out
# of stack on any path.
MAX_ANSWER_DEPTH = 256
_LEVEL = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NEITHER = bytes(range(256)).translate(None, b'"[]{}')  # all bytes but quotes and brackets


class AnswerTooDeep(ValueError):
    """An answer or event nesting arrays and objects deeper than MAX_ANSWER_DEPTH: not passed on."""


def read_json(body: bytes) -> Any:
    """An MCP answer's JSON, read strictly (UTF-8): what cannot be read here is not passed on.

    Raises ValueError (AnswerTooDeep among them), never RecursionError, on whichever thread it runs."""
    if nests_too_deep(body):
        raise AnswerTooDeep(f"the answer nests arrays and objects deeper than {MAX_ANSWER_DEPTH} levels")
    return json.loads(body.decode("utf-8"))


def nests_too_deep(body: bytes) -> bool:
    """Whether JSON text nests its arrays and objects deeper than MAX_ANSWER_DEPTH (`[]` is one level),
    read off the bytes before they are parsed, so the parser is only ever given what it reads on any
    thread. Exact for valid JSON; anything else the parser refuses anyway.

    Text that opens no more brackets than the limit cannot pass it (most answers). Otherwise a bracket
    counts unless it is inside a string: escaped backslashes are dropped first, then escaped quotes, and
    every other span between the quotes left is a string. About a quarter of json.loads's CPU on a tool
    list of 45,000 tools (0.10 s to 0.36 s for 9.8 MB, the least of 7 runs, on a busy machine).
    """
    if body.count(b"[") + body.count(b"{") <= MAX_ANSWER_DEPTH:
        return False
    quotes_and_brackets = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NEITHER)
    brackets = b"".join(quotes_and_brackets.split(b'"')[::2])
    return max(accumulate(map(_LEVEL.__getitem__, brackets)), default=0) > MAX_ANSWER_DEPTH


UPSTREAM_ANSWER = Problem.UPSTREAM_ANSWER.uri
DEFAULT_MAX_EVENT = 1024 * 1024
# A chunk of an event stream is read on the event loop unless it may complete an event longer than this,
# or one that may carry a tool list: then it is read in a worker thread (`SseRewriter.reads_off_loop`), as a
# whole answer is past the same size (`proxy.calls.mcp.answers.READ_ON_LOOP_BYTES`). One event of 45,000
# tool names took 1 to 1.5 s of the loop's CPU (review finding 2 of 2026-12-02).
EVENT_ON_LOOP_BYTES = 64 * 1024
# Bytes of an answer or event that may carry a tool list to filter (`filter_tool_list`, the gate's tool
# hints): the key `"tools"`, or any \u escape, which may spell that key (`"\u0074ools"` reads as `tools`).
MAY_LIST_TOOLS = (b'"tools"', b"\\u")


_UNCHECKED = "cedargate could not check the MCP server's answer, so it is not passed on"


def unreadable_problem(detail: str = "") -> dict[str, Any]:
    """The problem for a server's answer cedargate could not check, and so did not pass on."""
    return problem_document(Problem.UPSTREAM_ANSWER, 502, detail or _UNCHECKED)


def _event_bytes(answer: Mapping[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps(answer).encode() + b"\n\n"


def _id_key(ident: Any) -> str:
    return json.dumps(ident)  # 1 and "1" are different ids


class SseRewriter:
    """Rewrites a text/event-stream chunk by chunk: each complete event's data may be replaced.

    Used as mitmproxy's `response.stream` callable, so events reach the agent as they come (a long tool
    call's progress notifications are not buffered); only whole events are rewritten, and bytes of an
    event still incomplete wait for the next chunk. `extra` events are sent when the stream ends.

    One event may hold at most `max_event_bytes`: each is checked whole, so a server could otherwise
    make cedargate hold any amount. Past the cap the stream is refused: the agent gets, as the last
    event, a JSON-RPC error for each of `requests` (the ids it is still waiting on) saying why,
    nothing more of the server's stream is passed on, and `on_refused` is called (to end the exchange).
    Each chunk is searched once, so a long event costs its length, not its length squared.

    A chunk that may complete a large event, or one listing tools, is better read off the event loop
    (`reads_off_loop`): `read_ahead` reads it in a worker thread, and the call that follows for that chunk
    gives what was read (`addons.event_streams` does both, in the order the chunks came).
    """

    def __init__(self, rewrite: Callable[[Any], Any | None], extra: Iterable[dict[str, Any]] = (), *,
                 max_event_bytes: int = DEFAULT_MAX_EVENT, requests: Iterable[Any] = (),
                 on_refused: Callable[[], None] | None = None) -> None:
        self._rewrite = rewrite
        self._extra = list(extra)
        self._max_event = max_event_bytes
        self._waiting = {_id_key(ident): ident for ident in requests}
        self._on_refused = on_refused
        self._pending = bytearray()  # the start of an event not complete yet
        self._searched = 0  # where in _pending the search for its end resumes
        self._read: tuple[bytes, bytes | Exception] | None = None  # a chunk read ahead, and what it gave
        self.refused = False

    def __call__(self, chunk: bytes) -> list[bytes]:
        """mitmproxy's stream contract: the bytes to send for `chunk` (b"" at the end of the stream).

        A list, empty when the chunk completes no event: mitmproxy sends each item as one piece of the
        body, and an empty piece to an HTTP/1.1 client is the chunk that ends the body.
        """
        read, self._read = self._read, None
        if read is None:
            out = self.feed(chunk)
        elif read[0] != chunk:
            raise RuntimeError("an event stream was handed another chunk than the one it read ahead")
        elif isinstance(read[1], Exception):
            raise read[1]
        else:
            out = read[1]
        if self.refused and self._on_refused is not None:
            on_refused, self._on_refused = self._on_refused, None
            on_refused()  # here, on the loop, even when the refusal was read in a thread
        return [out] if out else []

    def reads_off_loop(self, chunk: bytes) -> bool:
        """Whether `chunk` is better read off the event loop: it may complete an event (it holds a line
        ending, or ends the stream) of more than EVENT_ON_LOOP_BYTES with what is pending, or one that
        may carry a tool list. A guess from the bytes, never a parse: reading is the same either way."""
        if self.refused or (chunk and b"\n" not in chunk and b"\r" not in chunk):
            return False
        pending = self._pending
        if len(pending) + len(chunk) > EVENT_ON_LOOP_BYTES:
            return True
        seam = bytes(pending[-8:]) + chunk[:8]  # a marker cut in two by the chunk's start
        return any(marker in chunk or marker in pending or marker in seam for marker in MAY_LIST_TOOLS)

    def read_ahead(self, chunk: bytes) -> None:
        """`feed` the chunk this stream is handed next, now, in whatever thread calls: the call for that
        chunk then gives what this read (or raises what it raised). Nothing else may call meanwhile."""
        try:
            self._read = (chunk, self.feed(chunk))
        except Exception as exc:
            self._read = (chunk, exc)

    def feed(self, chunk: bytes) -> bytes:
        """What the agent gets for this chunk of the server's stream; b"" ends the stream."""
        if self.refused:
            return b""  # what follows a refused event is never checked, so never passed on
        if not chunk:
            return self._end()
        pending = self._pending
        pending += chunk
        out = bytearray()
        start = 0  # where the current event begins
        while True:
            end, size = _event_end(pending, self._searched)
            if end < 0:
                break
            if end - start > self._max_event:
                return bytes(out) + self._refuse()
            out += self._event(bytes(pending[start:end + size]))
            start = self._searched = end + size
        del pending[:start]
        # The last bytes may be the start of the blank line ("\r\n\r"), which is not the event's.
        if len(pending) > self._max_event + 3:
            return bytes(out) + self._refuse()
        # A blank line may straddle this chunk and the next: resume a few bytes back, never inside a CRLF.
        resume = max(0, len(pending) - 3)
        if resume and pending[resume - 1:resume + 1] == b"\r\n":
            resume -= 1
        self._searched = resume
        return bytes(out)

    def _end(self) -> bytes:
        tail, self._pending = bytes(self._pending), bytearray()
        end, size = _event_end(tail, 0, final=True)
        if 0 <= end <= self._max_event:  # a last event whose blank line came with the last chunk
            out = self._event(tail[:end + size])
        elif end > self._max_event:
            return self._refuse()
        else:
            out = b""
        # What is left is an event the stream ends inside, which a client never dispatches (HTML's
        # SSE rules). It is dropped, not passed on: unfiltered, or glued to cedargate's own answers.
        out += b"".join(_event_bytes(answer) for answer in self._extra)
        self._extra = []
        return out

    def _refuse(self) -> bytes:
        """The last events of a refused stream: an error for each request still waiting, then ours."""
        self.refused = True
        self._pending = bytearray()
        detail = (f"the server sent an event of more than {self._max_event} bytes (max_mcp_event_bytes); "
                  "cedargate checks each event whole, so it and the rest of the stream were not passed on. "
                  "Ask the server for less (a smaller page or result), or ask the operator to raise the cap")
        log.warning("refused an MCP event stream: %s", detail)
        problem = unreadable_problem(detail)
        # JSON-RPC 2.0: an error whose request cannot be named has a null id.
        waiting = list(self._waiting.values()) or [None]
        errors = [{"jsonrpc": "2.0", "id": ident, "error": {"code": REFUSED_CODE, "message": problem["title"]
                   + ": " + detail, "data": problem}} for ident in waiting]
        out = b"".join(_event_bytes(answer) for answer in [*errors, *self._extra])
        self._extra = []
        return out

    def _answered(self, parsed: Any) -> None:
        for item in parsed if isinstance(parsed, list) else [parsed]:
            if isinstance(item, dict) and "method" not in item and ("result" in item or "error" in item):
                self._waiting.pop(_id_key(item.get("id")), None)

    def _event(self, event: bytes) -> bytes:
        lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        if not data:
            return event
        try:
            parsed = read_json(b"\n".join(data))
        except ValueError as exc:
            # Every message on an MCP stream is JSON; one that cannot be checked is not passed on.
            log.warning("dropped an MCP event that cedargate cannot read as UTF-8 JSON: %s", exc)
            return b""
        try:
            rewritten = self._rewrite(parsed)
        except Exception:  # never pass on what could not be checked; the stream itself goes on
            log.exception("cannot check an MCP event; it is dropped")
            return b""
        self._answered(parsed)
        if rewritten is None:
            return event
        kept = [line for line in lines if line and not line.startswith(b"data:")]
        return b"\n".join(kept + [b"data: " + json.dumps(rewritten).encode()]) + b"\n\n"


# A line ending (CRLF, LF or a CR not starting a CRLF) followed by another: the blank line ending an event.
_BLANK_LINE = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")


def _event_end(buffer: bytes | bytearray, start: int = 0, final: bool = False) -> tuple[int, int]:
    """Where the first event's last line ends, searching from `start`, and the length of the line
    endings after it; -1 if the buffer holds no complete event yet. A CR at the very end may be the
    first half of a CRLF, so it waits for the next chunk unless the stream has ended."""
    found = _BLANK_LINE.search(buffer, start)
    if found is None or (not final and found.end() == len(buffer) and buffer.endswith(b"\r")):
        return -1, 0
    return found.start(), found.end() - found.start()
