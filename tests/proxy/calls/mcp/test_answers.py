"""What an agent gets of an MCP server's answer: event streams passed on as mitmproxy streams them (no
empty piece that would end an HTTP/1.1 body early), events and whole answers within their caps, and a
refusal the agent's client can read when the server sends more than cedargate can check.

The rewriter and the answer check are the real ones; the server's stream is cut into chunks the way a
network cuts it.
"""

from __future__ import annotations

import gzip
import json
import re
import threading

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import proxy.calls.mcp.sse
from proxy.calls.decoding import AnswerTooLarge
from proxy.calls.mcp.answers import DEFAULT_MAX_ANSWER, check_answer
from proxy.calls.mcp.refusals import REFUSED_CODE
from proxy.calls.mcp.sse import (
    DEFAULT_MAX_EVENT,
    EVENT_ON_LOOP_BYTES,
    MAX_ANSWER_DEPTH,
    UPSTREAM_ANSWER,
    SseRewriter,
    nests_too_deep,
)
from proxy.calls.mcp.tools import filter_tool_list
from proxy.settings.config import Settings
from tests.support.event_stream import sse_data


def message(ident, text="ok") -> dict:
    return {"jsonrpc": "2.0", "id": ident, "result": {"content": [{"type": "text", "text": text}]}}


def tool_list(ident, *names) -> dict:
    return {"jsonrpc": "2.0", "id": ident, "result": {"tools": [{"name": n} for n in names]}}


def hide(*hidden):
    return lambda answer: filter_tool_list(answer, lambda names: {n for n in names if n not in hidden})


def keep(answer):
    return None


PROGRESS = {"jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": 1, "progress": 1}}
# Events with every kind of line ending, so that a cut can fall mid-line, between the two line ends of
# the blank line, and between the CR and the LF of a CRLF.
STREAM = (
    b"event: message\ndata: " + json.dumps(PROGRESS).encode() + b"\n\n"
    + b"id: 2\r\ndata: " + json.dumps(tool_list(1, "shown", "hidden")).encode() + b"\r\n\r\n"
    + b"data: " + json.dumps(message(3)).encode() + b"\r\r"
    + b": comment\ndata: " + json.dumps(message(4, "last")).encode() + b"\n\r\n"
)


def pieces(rewriter: SseRewriter, chunks) -> list[list[bytes]]:
    """What mitmproxy gets back from the stream callable for each chunk, then for the end (b"")."""
    return [rewriter(chunk) for chunk in chunks] + [rewriter(b"")]


# -- mitmproxy's stream contract ------------------------------------------------------------------------

@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_an_event_split_anywhere_gives_no_empty_piece_and_every_event(cut):
    # mitmproxy sends each returned piece as a body chunk; an empty one ends an HTTP/1.1 chunked body.
    returned = pieces(SseRewriter(hide("hidden")), [STREAM[:cut], STREAM[cut:]])
    assert all(isinstance(piece_list, list) for piece_list in returned)
    assert b"" not in [piece for piece_list in returned for piece in piece_list]
    events = sse_data(b"".join(piece for piece_list in returned for piece in piece_list))
    assert events == [PROGRESS, tool_list(1, "shown"), message(3), message(4, "last")]


@pytest.mark.parametrize("split", [
    pytest.param(b"data: {\"jsonrpc\": \"2.0\", \"id\": 1, \"re", id="mid-line"),
    pytest.param(b"data: " + json.dumps(message(1)).encode() + b"\n", id="between-the-two-newlines"),
    pytest.param(b"data: " + json.dumps(message(1)).encode() + b"\r\n\r", id="crlf-split-between-cr-and-lf"),
    pytest.param(b"data: " + json.dumps(message(1)).encode() + b"\r", id="first-crlf-split"),
])
def test_a_chunk_that_completes_no_event_sends_nothing(split):
    rewriter = SseRewriter(keep)
    assert rewriter(split) == []


def test_the_end_of_the_stream_sends_what_is_left_and_cedargates_answers():
    own = {"jsonrpc": "2.0", "id": 9, "error": {"code": REFUSED_CODE, "message": "no"}}
    rewriter = SseRewriter(keep, [own])
    assert rewriter(b"data: " + json.dumps(message(1)).encode() + b"\r\n\r") == []
    [last] = rewriter(b"")  # the CR that ends the stream ends the event too
    assert sse_data(last) == [message(1), own]


def test_a_stream_with_nothing_left_ends_with_nothing():
    assert SseRewriter(keep)(b"") == []


# -- one event at most max_event_bytes ------------------------------------------------------------------

def big_event(size: int) -> bytes:
    return b"data: " + json.dumps(message(1, "x" * size)).encode() + b"\n\n"


def test_an_event_at_the_cap_passes():
    event = big_event(5000)
    rewriter = SseRewriter(keep, max_event_bytes=len(event) - 2)  # the blank line is not the event's
    assert rewriter.feed(event) == event and not rewriter.refused


@pytest.mark.parametrize("chunk", [1000, 64 * 1024])
def test_an_unterminated_event_past_the_cap_ends_the_stream_with_an_error_for_each_waiting_request(chunk):
    ended = []
    rewriter = SseRewriter(keep, [{"jsonrpc": "2.0", "id": 8, "result": {"isError": True}}],
                           max_event_bytes=16 * 1024, requests=[1, "two", 3],
                           on_refused=lambda: ended.append(1))
    sent = rewriter.feed(b"data: " + json.dumps(message(1)).encode() + b"\n\n")  # request 1 is answered
    stream = b"data: {\"jsonrpc\": \"2.0\", \"id\": \"two\", \"result\": \"" + b"A" * (100 * 1024)
    returned = [rewriter(stream[at:at + chunk]) for at in range(0, len(stream), chunk)]
    out = b"".join(piece for piece_list in returned for piece in piece_list)
    assert b"AAAA" not in out  # nothing of the event that could not be checked
    assert ended == [1]
    events = sse_data(sent + out)
    assert [e["id"] for e in events] == [1, "two", 3, 8]
    for error in events[1:3]:
        assert error["error"]["code"] == REFUSED_CODE
        assert error["error"]["data"]["type"] == UPSTREAM_ANSWER and error["error"]["data"]["status"] == 502
        assert "more than 16384 bytes" in error["error"]["data"]["detail"]
        assert "max_mcp_event_bytes" in error["error"]["message"]
    # Whatever the server sends next is dropped: it would belong to the refused event, or come after it.
    assert rewriter(b"\n\ndata: " + json.dumps(message(5)).encode() + b"\n\n") == []
    assert rewriter(b"") == []
    assert ended == [1]


def test_a_complete_event_past_the_cap_in_one_chunk_is_refused_after_the_events_before_it():
    before = b"data: " + json.dumps(message(1)).encode() + b"\n\n"
    rewriter = SseRewriter(keep, max_event_bytes=4096)
    out = rewriter.feed(before + big_event(5000) + before)
    assert out.startswith(before) and b"xxxx" not in out
    assert [e.get("error", {}).get("code") for e in sse_data(out)] == [None, REFUSED_CODE]
    assert sse_data(out)[1]["id"] is None  # no request left waiting: JSON-RPC's id for "unknown"


def test_a_last_event_past_the_cap_at_the_end_of_the_stream_is_refused():
    rewriter = SseRewriter(keep, max_event_bytes=4096, requests=[1])
    assert rewriter(big_event(3000)[:-2] + b"xx") == []  # under the cap, not complete yet
    out = rewriter.feed(b"x" * 2000 + b"\r")  # past the cap, refused before it ends
    assert rewriter.refused and b"xxx" not in out and sse_data(out)[0]["id"] == 1


def test_each_chunk_is_searched_once(monkeypatch):
    searched = []
    blank_line = proxy.calls.mcp.sse._BLANK_LINE

    class Counting:
        def search(self, buffer, start=0):
            searched.append(len(buffer) - start)
            return blank_line.search(buffer, start)

    monkeypatch.setattr(proxy.calls.mcp.sse, "_BLANK_LINE", Counting())
    rewriter = SseRewriter(keep, max_event_bytes=8 * 1024 * 1024)
    chunk, chunks = b"A" * 1000, 1000
    rewriter.feed(b"data: ")
    for _ in range(chunks):
        assert rewriter(chunk) == []
    # Re-searching the whole buffer per chunk would scan ~500 MB here; each byte is searched about once.
    assert sum(searched) <= chunks * (len(chunk) + 3) + 100


EVENT_SIZES = [len(event) for event in re.split(rb"\n\n|\r\n\r\n|\r\r|\n\r\n", STREAM) if event]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), unique=True, max_size=30),
       st.sampled_from(EVENT_SIZES), st.integers(min_value=-4, max_value=4))
def test_a_stream_cut_anywhere_gives_what_it_gives_whole_under_any_cap(cuts, size, delta):
    # Caps at and around each event's size: an event is refused, or not, wherever the stream is cut.
    cap = size + delta
    bounds = [0, *sorted(cuts), len(STREAM)]
    whole = SseRewriter(hide("hidden"), max_event_bytes=cap, requests=[1, 3, 4])
    expected = whole.feed(STREAM) + whole.feed(b"")
    cut = SseRewriter(hide("hidden"), max_event_bytes=cap, requests=[1, 3, 4])
    got = b"".join(cut.feed(STREAM[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)) + cut.feed(b"")
    assert got == expected
    assert cut.refused == whole.refused == (cap < max(EVENT_SIZES))


# -- whole answers ----------------------------------------------------------------------------------------

def test_a_gzip_bomb_is_refused_as_too_large():
    bomb = gzip.compress(b"\0" * (1024 * 1024)) * 64  # 64 MiB from ~64 KB (gzip members, read in turn)
    with pytest.raises(AnswerTooLarge) as refused:
        check_answer(bomb, "gzip", "application/json", 200, keep, max_answer_bytes=4 * 1024 * 1024)
    assert str(refused.value) == "the answer is larger than 4194304 bytes once its gzip coding is decoded"


def test_an_identity_answer_past_the_cap_is_refused():
    body = json.dumps(message(1, "x" * 5000)).encode()
    with pytest.raises(AnswerTooLarge):
        check_answer(body, "identity", "application/json", 200, keep, max_answer_bytes=4096)


def test_an_encoded_answer_reaches_the_agent_decoded_as_checked():
    body = json.dumps(tool_list(1, "shown", "hidden")).encode()
    filtered = check_answer(gzip.compress(body), "gzip", "application/json", 200, hide("hidden"))
    assert json.loads(filtered.body) == tool_list(1, "shown")
    # Unchanged, but decoded: the bytes cedargate read, not a coding some client reads otherwise.
    assert check_answer(gzip.compress(body), "gzip", "application/json", 200, keep).body == body
    assert check_answer(body, "identity", "application/json", 200, keep).body is None  # passed as it came


def test_an_encoded_event_stream_is_read_with_the_event_cap():
    stream = big_event(10) + big_event(5000)
    checked = check_answer(gzip.compress(stream), "gzip", "text/event-stream", 200, keep, requests=[1],
                           max_event_bytes=4096)
    events = sse_data(checked.body)
    assert events[0] == message(1, "x" * 10) and events[1]["error"]["data"]["type"] == UPSTREAM_ANSWER
    assert b"xxxxxxxxxxxxxxxxxxxx" not in checked.body


def test_an_empty_answer_gets_cedargates_own_answers():
    own = ({"jsonrpc": "2.0", "id": 9, "error": {"code": REFUSED_CODE, "message": "no"}},)
    assert check_answer(b"", "gzip", "application/json", 202, keep, own).own_answers == own


def test_a_success_that_is_not_json_is_refused_and_an_error_page_passes():
    with pytest.raises(ValueError):
        check_answer(b"<html>ok</html>", "identity", "text/html", 200, keep)
    assert check_answer(b"<html>busy</html>", "identity", "text/html", 503, keep).body is None


def depth_of(value) -> int:
    """How deep a parsed JSON value nests its arrays and objects, walked without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


# Strings full of what a bracket counter could mistake: brackets, quotes, runs of backslashes.
TRICKY_TEXT = st.text(alphabet='[]{}"\\ a\u00e9\n', max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY_TEXT, inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.integers(min_value=0, max_value=MAX_ANSWER_DEPTH + 8), TRICKY_TEXT, st.booleans(),
       st.booleans())
@example(None, MAX_ANSWER_DEPTH, '"', False, False)  # an escaped quote, once per level
@example(None, MAX_ANSWER_DEPTH, "\\", False, False)  # an escaped backslash ending a string
def test_the_depth_limit_is_read_off_the_text_as_a_parser_reads_it(value, wrappers, key, ascii_only, indented):
    for level in range(wrappers):
        value = [value] if level % 2 else {key: value}
    text = json.dumps(value, ensure_ascii=ascii_only, indent=1 if indented else None).encode()
    assert nests_too_deep(text) == (depth_of(value) > MAX_ANSWER_DEPTH)


def deep(depth: int, ident: int = 1) -> bytes:
    """A tool result nesting `depth` levels: the message, its result, then lists."""
    return b'{"jsonrpc": "2.0", "id": %d, "result": {"rows": %s}}' % (
        ident, b"[" * (depth - 2) + b"]" * (depth - 2))


def test_an_answer_or_event_nesting_past_the_limit_is_refused_and_one_at_it_passes():
    # Review finding 4: the limit is the same wherever the answer is read (see the enforcer's tests).
    assert check_answer(deep(MAX_ANSWER_DEPTH), "identity", "application/json", 200, keep).body is None
    with pytest.raises(ValueError, match=f"deeper than {MAX_ANSWER_DEPTH} levels"):
        check_answer(deep(MAX_ANSWER_DEPTH + 1), "identity", "application/json", 200, keep)
    # An error page the parser cannot read goes on as it came, as any other unreadable one does.
    assert check_answer(deep(MAX_ANSWER_DEPTH + 1), "identity", "application/json", 500, keep).body is None
    stream = b"data: " + deep(MAX_ANSWER_DEPTH, 1) + b"\n\ndata: " + deep(MAX_ANSWER_DEPTH + 1, 2) + b"\n\n"
    assert [event["id"] for event in sse_data(SseRewriter(keep).feed(stream))] == [1]


def event(answer: dict) -> bytes:
    return b"data: " + json.dumps(answer).encode() + b"\n\n"


@pytest.mark.parametrize("chunk, off_loop", [
    (event(message(1)), False),  # a small tool result
    (event(message(1, "x" * EVENT_ON_LOOP_BYTES)), True),  # a large one
    (event(tool_list(1, "search_issues")), True),  # a tool list, however small
    (event(message(1, "\u0074ools")), True),  # an escape that may spell the key
    (event(message(1, "x" * EVENT_ON_LOOP_BYTES))[:-2], False),  # no line ending: completes no event
])
def test_a_chunk_that_may_complete_a_large_event_or_a_tool_list_is_read_off_the_event_loop(chunk, off_loop):
    # Review finding 2: filtering a tool list asks the policy once per name (1 to 1.5 s of the loop's CPU
    # for one event of 45,000 names); small events stay on the loop, as small whole answers do.
    assert SseRewriter(keep).reads_off_loop(chunk) == off_loop


def test_the_end_of_a_stream_or_a_marker_cut_by_a_chunk_is_read_off_the_event_loop():
    rewriter = SseRewriter(keep)
    assert rewriter(b"data: " + b"x" * EVENT_ON_LOOP_BYTES) == []
    assert rewriter.reads_off_loop(b"")  # the stream ends: the pending event is read
    rewriter = SseRewriter(keep)
    assert rewriter(b'data: {"result": {"to') == []
    assert rewriter.reads_off_loop(b'ols": []}}\n\n')


def test_a_chunk_read_ahead_gives_what_reading_it_then_would_and_refuses_on_the_loop():
    stream = event(message(1)) + event(tool_list(2, "search_issues", "delete_repo")) + event(message(3))
    ended: list[int] = []
    ahead = SseRewriter(hide("delete_repo"), requests=[4], max_event_bytes=200, on_refused=lambda: ended.append(1))
    now = SseRewriter(hide("delete_repo"), requests=[4], max_event_bytes=200)
    reader = threading.Thread(target=ahead.read_ahead, args=(stream,))
    reader.start()
    reader.join()
    assert ahead(stream) == now(stream)
    with pytest.raises(RuntimeError, match="another chunk"):  # read ahead for one chunk, handed another
        ahead.read_ahead(event(message(5)))
        ahead(event(message(6)))
    over = b"data: " + b"x" * 300
    reader = threading.Thread(target=ahead.read_ahead, args=(over,))
    reader.start()
    reader.join()
    assert ended == []  # not from the thread: ending the exchange is the loop's to do
    assert sse_data(b"".join(ahead(over)))[0]["id"] == 4 and ended == [1]


def test_the_caps_default_to_the_settings_defaults():
    settings = Settings()
    assert (settings.max_mcp_event_bytes, settings.max_mcp_answer_bytes) == (DEFAULT_MAX_EVENT, DEFAULT_MAX_ANSWER)
