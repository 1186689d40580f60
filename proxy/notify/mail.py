"""The email channel: a plain-text message over SMTP (stdlib `smtplib`) to the reviewers concerned.

Recipients are the approvers holding a role the notice concerns who have an `email` in their approver
entry (the primary reviewer first, when the chain names one), and the channel's fixed `to` addresses.
The server is the channel's `host` (or the variable `host_env` names) and `port`; with `starttls` (the
default) the connection is upgraded before anything is sent, and a login (`username_env`,
`password_env`) happens only over it. Every header comes from cedargate's own values or from text made
printable (`proxy.vocabulary.printable` turns CR and LF into visible escapes), and `email.message`
refuses a header with a line break besides, so nothing an agent writes can add a header or a
recipient. The Message-ID derives from the idempotency key, so a second copy of one event (a retry
after a lost answer) is recognisably the same message.
"""

from __future__ import annotations

import logging
import os
import smtplib
import ssl
from collections.abc import Mapping
from email.message import EmailMessage
from email.utils import formatdate

from proxy.notify.channels import DeliveryError
from proxy.notify.notices import Notice
from proxy.settings.config import ApproverCredential
from proxy.settings.notifications import EmailChannel

log = logging.getLogger(__name__)


def recipients(notice: Notice, config: EmailChannel, approvers: Mapping[str, ApproverCredential]) -> list[str]:
    concerned = set(notice.roles)
    named = [notice.primary] if notice.primary else []
    ordered = named + sorted(a for a in approvers if a not in named)
    found: list[str] = []
    for approver in ordered:
        entry = approvers.get(approver)
        if entry is not None and entry.email and concerned & set(entry.roles) and approver != notice.agent:
            found.append(entry.email)
    found += config.to
    return list(dict.fromkeys(found))  # each once, in order


def text_of(notice: Notice) -> str:
    lines = [notice.title, "", f"Agent:      {notice.agent}", f"Call:       {notice.method} {notice.url}",
             f"Action:     {notice.action}", f"Target:     {notice.resource}"]
    if notice.tool:
        lines.append(f"Tool:       {notice.tool}")
    lines += [f"Severity:   {notice.severity or 'not classified'}"
              + ("" if notice.reversible is None else " (reversible)" if notice.reversible else " (irreversible)")]
    if notice.kind in ("opened", "reminder", "escalated", "info_requested") and notice.deadline:
        lines.append(f"Decide by:  {notice.deadline}")
    lines.append(f"Reviewers:  {', '.join(notice.roles) or 'none named'}")
    if notice.primary:
        lines.append(f"Primary:    {notice.primary}" + (f" (fallback: {', '.join(notice.fallback)})"
                                                        if notice.fallback else ""))
    if notice.tier is not None:
        lines.append(f"Tier:       {notice.tier}")
    if notice.key_arguments:
        lines += ["", "Key arguments:"] + [f"  {name}: {value}" for name, value in notice.key_arguments.items()]
    lines += ["", "The agent's justification:", f"  {notice.justification or '(none given)'}"]
    if notice.reason:
        lines += ["", f"{'Question' if notice.kind == 'info_requested' else 'Reason'} ({notice.actor}):",
                  f"  {notice.reason}"]
    lines += ["", f"Open the request: {notice.link}", "", f"-- cedargate, request {notice.override_id}"]
    return "\n".join(lines) + "\n"


class Email:
    def __init__(self, name: str, config: EmailChannel, approvers: Mapping[str, ApproverCredential],
                 environ: Mapping[str, str] = os.environ) -> None:
        self.name = name
        self.config = config
        self.approvers = approvers
        self._environ = environ

    def message(self, notice: Notice, key: str) -> EmailMessage:
        to = recipients(notice, self.config, self.approvers)
        if not to:
            raise DeliveryError(
                f"no recipients: no approver of {', '.join(notice.roles) or 'any role'} has an email, and the "
                "channel has no `to` addresses", permanent=True)
        mail = EmailMessage()
        mail["From"] = self.config.sender
        mail["To"] = ", ".join(to)
        mail["Subject"] = "[cedargate] " + " ".join(notice.title.split())
        mail["Date"] = formatdate(usegmt=True)
        mail["Message-ID"] = f"<{key}@cedargate>"
        mail["Idempotency-Key"] = key
        mail["Cedargate-Event"] = notice.kind
        mail.set_content(text_of(notice))
        return mail

    def send(self, notice: Notice, key: str) -> None:
        mail = self.message(notice, key)
        host = self.config.host or self._environ.get(self.config.host_env or "")
        if not host:
            raise DeliveryError(f"environment variable {self.config.host_env} (the SMTP server) is not set")
        login = None
        if self.config.username_env and self.config.password_env:
            user, password = self._environ.get(self.config.username_env), self._environ.get(self.config.password_env)
            if not user or not password:
                raise DeliveryError(f"environment variables {self.config.username_env} and "
                                    f"{self.config.password_env} (the SMTP login) must both be set")
            login = (user, password)
        shown = f"smtp://{host}:{self.config.port}"
        try:
            with smtplib.SMTP(host, self.config.port, timeout=self.config.timeout) as server:
                if self.config.starttls:
                    server.starttls(context=ssl.create_default_context())
                if login is not None:
                    server.login(*login)
                refused = server.send_message(mail)
        except smtplib.SMTPNotSupportedError:
            raise DeliveryError(f"{shown} does not offer STARTTLS (set starttls: false only for a relay on "
                                "loopback)") from None
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(f"{shown} refused every recipient ({_codes(exc.recipients)})", permanent=True) from None
        except smtplib.SMTPResponseException as exc:
            # 5xx: this message is refused for good (too large, policy); 4xx: try again later. A refused
            # login or sender is the operator's to mend: its messages wait.
            permanent = exc.smtp_code >= 500 and not isinstance(
                exc, smtplib.SMTPAuthenticationError | smtplib.SMTPSenderRefused)
            said = f"{shown} answered {exc.smtp_code} {_said(exc.smtp_error)}"
            raise DeliveryError(said, permanent=permanent) from None
        except (smtplib.SMTPException, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise DeliveryError(f"{shown} could not be reached: {why}") from None
        if refused:
            # The others took it, and a retry would send it to them again: delivered, and the refusals said.
            log.warning("notification %s: %s refused some recipients (%s)", key, shown, _codes(refused))


def _codes(refused: Mapping[str, tuple[int, bytes]]) -> str:
    return "; ".join(f"{address}: {code}" for address, (code, _) in sorted(refused.items()))


def _said(said: bytes | str) -> str:
    text = said.decode("utf-8", "replace") if isinstance(said, bytes) else said
    return " ".join(text.split())[:200]
