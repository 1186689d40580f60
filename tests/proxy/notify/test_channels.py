"""What a failed try says (in /status and the log) about a channel whose URL is a secret: which
variable to mend, never what it holds. A Slack incoming-webhook URL's path is its token."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from notify_support import open_request

from proxy.notify.channels import DeliveryError, post
from proxy.notify.notifier import missing_variables
from proxy.settings.notifications import Notifications

TOKEN = "xoxSecretPart9f2c"
# An env file's trailing comment, which docker's --env-file keeps in the value.
MALFORMED = f"http://127.0.0.1:9/services/T000/B000/{TOKEN} # ops alerts"


def slack_config() -> Notifications:
    return Notifications.model_validate({
        "channels": {"team": {"type": "slack", "url_env": "SLACK_URL"}},
        "routes": [{"events": ["opened"], "channels": ["team"]}],
        "retry_initial": "1s", "retry_max": "1s",
    })


def test_a_malformed_slack_url_is_reported_by_its_variable_never_by_its_secret_path(
        workflow, make_notifier, caplog: pytest.LogCaptureFixture) -> None:
    notifier = make_notifier(slack_config(), {"SLACK_URL": MALFORMED})
    open_request(workflow)
    with caplog.at_level(logging.WARNING):
        notifier.sweep()
    [state] = notifier.status()
    assert state.pending == 1 and state.last_error  # the try failed and the message was kept
    assert "SLACK_URL" in state.last_error and TOKEN not in state.last_error, state.last_error
    assert caplog.records and TOKEN not in caplog.text


def test_the_start_warning_names_a_malformed_url_variable_not_its_value() -> None:
    [warning] = missing_variables(slack_config(), {"SLACK_URL": MALFORMED})
    assert "SLACK_URL" in warning and "space" in warning and TOKEN not in warning
    assert missing_variables(slack_config(), {"SLACK_URL": "https://hooks.slack.example/services/T/B/x"}) == []


class Trickler:
    """A receiver on loopback that takes the request, then answers one byte of its headers at a time,
    each well within a socket's timeout: it would hold a send by per-operation timeouts for ever."""

    def __init__(self, pause: float = 0.05, bytes_to_send: int = 400) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pause, self.left = pause, bytes_to_send
        self.sent = 0
        self.cut_off = threading.Event()  # the sender hung up before the answer was done
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            connection.recv(65536)
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\n")
                for _ in range(self.left):  # bounded: the test never waits past it
                    connection.sendall(b"X-Slow: " + b"a" * 1 + b"\r\n")
                    self.sent += 1
                    time.sleep(self.pause)
                connection.sendall(b"Content-Length: 0\r\n\r\n")
            except OSError:
                self.cut_off.set()

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


def test_a_receiver_that_trickles_its_answer_cannot_hold_a_send_past_its_timeout() -> None:
    trickler = Trickler()
    try:
        with pytest.raises(DeliveryError, match=r"did not answer within 0\.5 s"):
            post(f"http://127.0.0.1:{trickler.port}/hook", b"{}", {"Content-Type": "application/json"}, 0.5)
        trickler.thread.join(30)
        # The receiver still had most of its answer to give when the sender hung up on it.
        assert trickler.cut_off.is_set() and trickler.sent < trickler.left
    finally:
        trickler.close()
