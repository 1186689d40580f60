"""Decoding an answer's content coding within a size cap: what an MCP server's compressed answer says.

A few hundred kilobytes of gzip can decode to gigabytes (a decompression bomb), so the decoders here
produce their output piece by piece and stop as soon as it passes the cap: a bomb costs at most the
cap plus one piece of work, never its full size. They read what mitmproxy's decoders (and so the
answer cedargate used to check) read: gzip members one after another, zlib-wrapped or raw deflate,
brotli, and zstd frames one after another. Plain Python; the caller runs it off the event loop.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli
import zstandard

PIECE = 64 * 1024  # most bytes one zlib step may produce
FEED = 64 * 1024  # input given to one zlib step: what a step copies of its unread input stays small
# Input fed to one brotli step: the binding has no output limit, and one command of a brotli stream
# may repeat up to 16 MiB, so one input byte at a time is what bounds the overshoot.
BROTLI_STEP = 1
# Input fed to one zstd step: a block decodes to at most 128 KiB and takes at least 4 bytes.
ZSTD_STEP = 64
# RFC 9659: a zstd content coding's window is at most 8 MB; a larger frame is refused, not allocated.
ZSTD_MAX_WINDOW = 8 * 1024 * 1024
ENCODINGS = ("identity", "gzip", "deflate", "br", "zstd")


class AnswerTooLarge(ValueError):
    """The decoded answer is larger than the cap."""

    def __init__(self, limit: int, encoding: str) -> None:
        coded = "" if encoding == "identity" else f" once its {encoding} coding is decoded"
        super().__init__(f"the answer is larger than {limit} bytes{coded}")
        self.limit = limit


class _Sink:
    """Decoded bytes, refused the moment they pass the cap."""

    def __init__(self, limit: int, encoding: str) -> None:
        self.out = bytearray()
        self.limit = limit
        self.encoding = encoding

    def add(self, piece: bytes | memoryview) -> None:
        self.out += piece
        if len(self.out) > self.limit:
            raise AnswerTooLarge(self.limit, self.encoding)


def decode_bounded(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded from `encoding` (a Content-Encoding value, lower case).

    Raises AnswerTooLarge as soon as the decoded bytes pass `limit`, and ValueError for an encoding
    not in ENCODINGS or a body that does not decode (corrupt, truncated, trailing garbage).
    """
    decoder = _DECODERS.get(encoding)
    if decoder is None:
        raise ValueError(f"cedargate does not decode the content coding {encoding!r}")
    sink = _Sink(limit, encoding)
    if not body:  # no body (a 202, say), whatever coding its headers name
        return b""
    try:
        decoder(memoryview(body), sink)
    except (zlib.error, brotli.error, zstandard.ZstdError) as exc:
        raise ValueError(f"the answer's {encoding} coding does not decode: {exc}") from None
    return bytes(sink.out)


def _identity(body: memoryview, sink: _Sink) -> None:
    sink.add(body)


def _zlib_stream(body: memoryview, start: int, wbits: int, sink: _Sink) -> int:
    """Decode one zlib, gzip or raw deflate stream that starts at `start`; where it ends in `body`."""
    stream = zlib.decompressobj(wbits)
    at = start
    while not stream.eof and at < len(body):
        data: bytes | memoryview = body[at:at + FEED]
        at += len(data)
        while True:
            sink.add(stream.decompress(data, PIECE))
            data = stream.unconsumed_tail
            if stream.eof or not data:
                break
    while not stream.eof:  # output held back by the step limit after the last input
        piece = stream.decompress(b"", PIECE)
        if not piece:
            raise ValueError("the compressed stream ends before its end marker (truncated)")
        sink.add(piece)
    return at - len(stream.unused_data)


def _gzip(body: memoryview, sink: _Sink) -> None:
    # Like Python's gzip module (mitmproxy's decoder): members follow one another, zero padding between.
    at = 0
    while True:
        at = _zlib_stream(body, at, 16 + zlib.MAX_WBITS, sink)
        while at < len(body) and body[at] == 0:
            at += 1
        if at == len(body):
            return
        if body[at:at + 2] != b"\x1f\x8b":  # type: ignore[comparison-overlap]  # memoryview == bytes compares contents
            raise ValueError("bytes after the last gzip member that are not another member")


def _deflate(body: memoryview, sink: _Sink) -> None:
    # Like mitmproxy: zlib-wrapped deflate (RFC 9110), else raw deflate, which some servers send.
    # What follows the stream is ignored, as zlib.decompress ignores it.
    try:
        _zlib_stream(body, 0, zlib.MAX_WBITS, sink)
    except AnswerTooLarge:
        raise
    except (zlib.error, ValueError):
        sink.out.clear()
        _zlib_stream(body, 0, -zlib.MAX_WBITS, sink)


def _brotli(body: memoryview, sink: _Sink) -> None:
    decoder = brotli.Decompressor()
    for at in range(0, len(body), BROTLI_STEP):
        sink.add(decoder.process(body[at:at + BROTLI_STEP]))
    if not decoder.is_finished():
        raise ValueError("the brotli stream ends before its last block (truncated)")


def _zstd(body: memoryview, sink: _Sink) -> None:
    # Frames follow one another (mitmproxy reads across frames); each one must be complete.
    context = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    at = 0
    while at < len(body):
        frame = context.decompressobj()
        while not frame.eof and at < len(body):
            data = body[at:at + ZSTD_STEP]
            at += len(data)
            sink.add(frame.decompress(data))
        if not frame.eof:
            raise ValueError("the zstd frame ends before its last block (truncated)")
        at -= len(frame.unused_data)


_DECODERS: dict[str, Callable[[memoryview, _Sink], None]] = {
    "identity": _identity, "gzip": _gzip, "deflate": _deflate, "br": _brotli, "zstd": _zstd,
}
