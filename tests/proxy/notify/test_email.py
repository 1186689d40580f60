"""Email notifications, delivered to a real SMTP sink on loopback (aiosmtpd): to the approvers of the roles
concerned who have an address and to the channel's fixed ones; nothing the agent writes adds a header or
a recipient; a server that is down or refuses is a failure /status shows, and nothing is lost."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from notify_support import SECURITY, open_request

from proxy.cedar.escalation import Requirement
from proxy.settings.notifications import Notifications


class Sink:
    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        mail = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(mail, EmailMessage)
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), mail))
        return "250 OK"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[Sink, int]]:
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield sink, controller.port
    finally:
        controller.stop()


def email_config(port: int, *, starttls: bool = False, to: tuple[str, ...] = ("oncall@example.test",)) -> Notifications:
    return Notifications.model_validate({
        "review_url": "https://cedargate.example.test",
        "channels": {"mail": {"type": "email", "from": "cedargate@example.test", "host": "127.0.0.1", "port": port,
                              "starttls": starttls, "to": list(to)}},
        "routes": [{"events": ["opened", "decided"], "channels": ["mail"]}],
        "retry_initial": "1s", "retry_max": "1s",
    })


def wait_mail(sink: Sink, count: int, sweep: Any) -> list[tuple[str, list[str], EmailMessage]]:
    import time

    deadline = time.monotonic() + 20
    while len(sink.received) < count and time.monotonic() < deadline:
        sweep()
        time.sleep(0.05)
    return sink.received


def test_a_request_is_mailed_to_the_reviewers_concerned_with_an_address(workflow, smtp, make_notifier):
    sink, port = smtp
    notifier = make_notifier(email_config(port))
    override = open_request(workflow, justification="instance is wedged")
    [(sender, recipients, mail)] = wait_mail(sink, 1, notifier.sweep)
    # erin holds engineering-manager and has an address; max holds it without one; sam is not concerned.
    assert sender == "cedargate@example.test"
    assert recipients == ["erin@example.test", "oncall@example.test"]
    assert mail["To"] == "erin@example.test, oncall@example.test"
    assert mail["Subject"] == '[cedargate] Review needed: ops-bot asks to POST Host::"127.0.0.1"'
    assert mail["Message-ID"] == f"<{mail['Idempotency-Key']}@cedargate>"
    body = mail.get_content()
    assert "instance is wedged" in body and "engineering-manager" in body
    assert f"https://cedargate.example.test/inbox/requests/{override.id}" in body

    security = open_request(workflow, SECURITY, path="/v1/volumes/vol-1")
    mails = wait_mail(sink, 2, notifier.sweep)
    assert mails[1][1] == ["sam@example.test", "oncall@example.test"]
    assert security.id in mails[1][2].get_content()


def test_what_the_agent_wrote_adds_no_header_and_no_recipient(workflow, smtp, make_notifier):
    sink, port = smtp
    notifier = make_notifier(email_config(port))
    open_request(workflow, justification="fine\r\nBcc: thief@evil.example\r\nSubject: approved", body=b"{}",
                 path="/v1/instances/i-1/stop%0d%0aBcc:%20thief@evil.example")
    [(_, recipients, mail)] = wait_mail(sink, 1, notifier.sweep)
    assert recipients == ["erin@example.test", "oncall@example.test"]
    assert mail["Bcc"] is None and len(mail.get_all("Subject") or []) == 1
    assert "thief@evil.example" not in mail["To"]
    assert "fine\\r\\nBcc: thief@evil.example" in mail.get_content()  # shown, escaped, in the body only


def test_a_server_that_is_down_keeps_the_mail_until_it_is_back(workflow, make_notifier):
    port = free_port()
    notifier = make_notifier(email_config(port))
    open_request(workflow)
    notifier.sweep()
    [state] = notifier.status()
    assert state.pending == 1 and state.failing_since is not None
    assert state.last_error is not None and state.last_error.startswith(f"smtp://127.0.0.1:{port} could not be reached")

    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        [(_, recipients, _)] = wait_mail(sink, 1, notifier.sweep)
    finally:
        controller.stop()
    assert recipients == ["erin@example.test", "oncall@example.test"]
    [state] = notifier.status()
    assert (state.pending, state.delivered, state.failing_since) == (0, 1, None)


def test_starttls_is_required_unless_turned_off(workflow, smtp, make_notifier):
    sink, port = smtp
    notifier = make_notifier(email_config(port, starttls=True))
    open_request(workflow)
    notifier.sweep()
    assert sink.received == []
    [state] = notifier.status()
    assert state.pending == 1 and "does not offer STARTTLS" in (state.last_error or "")


def test_with_nobody_to_mail_the_message_is_kept_as_failed_saying_why(workflow, smtp, make_notifier):
    sink, port = smtp
    notifier = make_notifier(email_config(port, to=()))
    open_request(workflow, Requirement("large-refunds", ("finance",), 1), path="/v1/refunds")
    notifier.sweep()
    [state] = notifier.status()
    assert (state.pending, state.failed) == (0, 1)
    assert "no recipients: no approver of finance has an email" in (state.last_error or "")
