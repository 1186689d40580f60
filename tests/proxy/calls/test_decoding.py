"""Decoding an answer's content coding within a cap: the same bytes mitmproxy's decoders give for what
decodes, a refusal for what does not, and a decompression bomb stopped a little past the cap."""

from __future__ import annotations

import gzip
import os
import zlib

import brotli
import pytest
import zstandard
from mitmproxy.net import encoding as mitmproxy_encoding

import proxy.calls.decoding
from proxy.calls.decoding import PIECE, AnswerTooLarge, decode_bounded

TEXT = os.urandom(50_000) + b'{"jsonrpc": "2.0", "id": 1}' * 10_000
UNLIMITED = 1 << 30


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("coding,body", [
    ("identity", TEXT),
    ("gzip", gzip.compress(TEXT)),
    ("gzip", gzip.compress(b"first ") + b"\0\0" + gzip.compress(TEXT)),  # members in turn, padding between
    ("gzip", gzip.compress(b"")),
    ("deflate", zlib.compress(TEXT)),
    ("deflate", zlib.compress(TEXT)[2:-4]),  # raw deflate, which some servers send
    ("br", brotli.compress(TEXT)),
    ("zstd", zstd(TEXT) + zstd(b"second frame")),
])
def test_what_decodes_gives_what_mitmproxy_gives(coding, body):
    assert decode_bounded(body, coding, UNLIMITED) == mitmproxy_encoding.decode(body, coding)


@pytest.mark.parametrize("coding", ["identity", "gzip", "deflate", "br", "zstd"])
def test_an_empty_body_is_empty_whatever_its_coding(coding):
    assert decode_bounded(b"", coding, 10) == b""


@pytest.mark.parametrize("coding,body", [
    ("gzip", gzip.compress(TEXT)[:-3]),
    ("gzip", gzip.compress(b"a") + b"trailing"),
    ("gzip", gzip.compress(b"a") + b"\x1f"),
    ("deflate", zlib.compress(TEXT)[:-10]),
    ("br", brotli.compress(TEXT)[:-2]),
    ("br", brotli.compress(b"a") + b"x"),
    ("zstd", zstd(TEXT)[:-3]),
    ("zstd", zstd(TEXT) + b"junk"),
    ("base64", b"e30="),
])
def test_what_does_not_decode_is_refused(coding, body):
    with pytest.raises(ValueError) as refused:
        decode_bounded(body, coding, UNLIMITED)
    assert not isinstance(refused.value, AnswerTooLarge)


BOMB = 32 * 1024 * 1024
CAP = 4 * 1024 * 1024
ZEROS_MIB = b"\0" * (1024 * 1024)
# How a bomb is made in each coding, and how far past the cap its decoder may get before it stops: one
# step's output. One input byte of brotli may stand for a 16 MiB repeat; of zstd, a 128 KiB block takes 4.
BOMBS = {
    "identity": (lambda: b"\0" * (CAP + 1), 1),
    "gzip": (lambda: gzip.compress(ZEROS_MIB) * (BOMB // len(ZEROS_MIB)), PIECE),  # members, read in turn
    "deflate": (lambda: zlib.compress(b"\0" * BOMB, 9), PIECE),
    "br": (lambda: brotli.compress(b"\0" * BOMB, quality=5), 16 * 1024 * 1024),
    "zstd": (lambda: zstandard.ZstdCompressor(level=3).compress(b"\0" * BOMB), 2 * 1024 * 1024 + 128 * 1024),
}


@pytest.mark.parametrize("coding", BOMBS)
def test_a_bomb_is_stopped_a_little_past_the_cap(coding, monkeypatch):
    make, overshoot = BOMBS[coding]
    body = make()
    produced = []
    add = proxy.calls.decoding._Sink.add

    def counting(sink, piece):
        produced.append(len(piece))
        add(sink, piece)

    monkeypatch.setattr(proxy.calls.decoding._Sink, "add", counting)
    with pytest.raises(AnswerTooLarge) as refused:
        decode_bounded(body, coding, CAP)
    assert sum(produced) <= CAP + overshoot
    assert refused.value.limit == CAP and str(CAP) in str(refused.value)


def test_a_zstd_frame_asking_for_a_window_past_8_mb_is_refused():
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=24)  # 16 MiB window
    body = zstandard.ZstdCompressor(compression_params=params).compress(os.urandom(64) * 300_000)
    with pytest.raises(ValueError):
        decode_bounded(body, "zstd", UNLIMITED)
