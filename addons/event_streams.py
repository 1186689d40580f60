"""Large events of an MCP event stream read in a worker thread, in the order they came.

mitmproxy hands each chunk of a streamed answer to the response's `stream` callable on the event loop,
and sends on what it returns: the callable cannot wait for a thread. cedargate's rewriter of MCP event
streams (`proxy.calls.mcp.sse.SseRewriter`) reads, filters and writes each whole event, and filtering a
tool list asks the policy once per tool name: one event of 45,000 names held the loop, and so every
other call through the process, for 1 to 1.5 s (review finding 2 of 2026-12-02).

So `install` changes the state of mitmproxy's HTTP stream layer that passes a streamed answer on: before
it hands the stream a chunk that the stream would rather read off the loop (`reads_off_loop`), the layer
fires `ReadOffLoopHook`. As for every hook, the stream's layer waits until the hook's addon is done (the
enforcer, which reads the chunk ahead in a worker thread: `read_ahead`), and what the server sends
meanwhile waits in the layer's queue, in order; then the layer hands the stream the chunk as always, and
the stream gives what the thread read. Other chunks are read on the loop, as before.
Written against mitmproxy 11.0.2 (pinned below 12); `install` checks what it replaces is there.
"""

from __future__ import annotations

from dataclasses import dataclass

from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import HttpStream, ResponseData, ResponseEndOfMessage

from proxy.calls.mcp.sse import SseRewriter


@dataclass
class ChunkToRead:
    """A chunk of a streamed answer, for its stream to read ahead in a worker thread."""

    stream: SseRewriter
    chunk: bytes  # b"": the answer ended

    def __call__(self) -> None:
        self.stream.read_ahead(self.chunk)


@dataclass
class ReadOffLoopHook(commands.StartHook):
    """Read a chunk of a streamed answer ahead, off the event loop, before its stream is handed the chunk.
    (One argument: mitmproxy's proxy server passes a hook exactly one.)"""

    read: ChunkToRead


_mitmproxys_state = HttpStream.state_stream_response_body


def install() -> None:
    """Have mitmproxy's HTTP layer fire `ReadOffLoopHook` where a stream asks for it, once per process."""
    if getattr(HttpStream.state_stream_response_body, "cedargate", False):
        return
    if HttpStream.state_stream_response_body.__qualname__ != "HttpStream.state_stream_response_body":
        raise RuntimeError("mitmproxy's HttpStream streams answers otherwise: cedargate needs mitmproxy 11")
    HttpStream.state_stream_response_body = _state_stream_response_body  # type: ignore[method-assign]


def _state_stream_response_body(self: HttpStream, event: events.Event) -> layer.CommandGenerator[None]:
    stream = self.flow.response.stream if self.flow.response else None
    if isinstance(stream, SseRewriter) and isinstance(event, (ResponseData, ResponseEndOfMessage)):
        chunk = event.data if isinstance(event, ResponseData) else b""
        if stream.reads_off_loop(chunk):
            yield ReadOffLoopHook(ChunkToRead(stream, chunk))
    yield from _mitmproxys_state(self, event)


_state_stream_response_body.cedargate = True  # type: ignore[attr-defined]
