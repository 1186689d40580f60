"""A webhook receiver on loopback, as an operator would write one: it checks cedargate's signature, keeps
every delivery it is sent, and can be taken down and brought back on the same port (a channel outage).

Shared by the notification tests (tests/proxy/notify) and the end-to-end ones (tests/e2e). `answer`
sets what it answers (200 by default; a 5xx or 4xx to play a failing or refusing receiver).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from proxy.notify.webhook import SIGNATURE, verify


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    signed: bool  # the signature verified under the receiver's secret

    @property
    def key(self) -> str:
        return self.headers.get("idempotency-key", "")

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    secret: bytes
    port: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    answer: int = 200
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/cedargate"

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                signed = verify(receiver.secret, headers.get(SIGNATURE.lower(), ""), body)
                with receiver._lock:
                    receiver.deliveries.append(Delivery(self.path, headers, body, signed))
                    status = receiver.answer
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)  # reuses the port it had
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def down(self) -> None:
        """Stop listening: a try now finds the connection refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def received(self, predicate: Callable[[Delivery], bool] = lambda d: True) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if predicate(d)]

    def wait_for(self, count: int, timeout: float = 20.0, predicate: Callable[[Delivery], bool] = lambda d: True,
                 poke: Callable[[], object] | None = None) -> list[Delivery]:
        """The deliveries matching `predicate` once there are `count` (or all there are after `timeout`);
        `poke` runs between looks (a sweep, in tests that drive the notifier themselves)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.received(predicate)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            if poke is not None:
                poke()
            time.sleep(0.05)


@contextmanager
def webhook_receiver(secret: bytes) -> Iterator[Receiver]:
    receiver = Receiver(secret)
    receiver.up()
    try:
        yield receiver
    finally:
        receiver.down()
