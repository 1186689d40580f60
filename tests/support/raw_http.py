"""Reading an answer off a raw socket, for tests whose client must not be a full HTTP client: a
connection refused before the proxy reads a byte, answered and closed; and that refusal at the proxy's
connection ceiling as an agent hears it, under `cedargate run` and under mitmdump alike."""

from __future__ import annotations

import json
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


def assert_refused_saturated(port: int, request: bytes, timeout: float, connections: int) -> None:
    """A new connection to the proxy on 127.0.0.1:`port` sending `request` is answered 503 proxy-saturated
    (Retry-After 5, problem+json naming its ceiling of `connections`) and closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as refused:
        refused.sendall(request)
        status, headers, body = read_answer(refused, timeout)
    answer = (status, headers, body)
    assert status == 503 and headers.get("retry-after") == "5", answer
    assert headers.get("content-type") == "application/problem+json", answer
    problem = json.loads(body)
    assert problem["type"] == "urn:cedargate:problem:proxy-saturated", problem
    assert f"{connections} of its {connections} connections" in problem["detail"], problem
