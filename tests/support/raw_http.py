"""Reading an answer off a raw socket, for tests whose client must not be a full HTTP client: a
connection refused before the proxy reads a byte, answered and closed."""

from __future__ import annotations

import socket


def read_answer(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """An HTTP answer read to the connection's end: its status, headers (lower-cased) and body."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    return int(status_line.split()[1]), {k.strip().lower(): v.strip() for k, _, v in
                                         (line.partition(":") for line in lines)}, body
