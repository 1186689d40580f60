"""The notifications' sweep: read new audit events into the outbox, then deliver what each channel owes.

`Notifier.sweep` is the core's background job (`proxy.oversight.jobs.Job`, composed in
`proxy.runtime`): it never runs on a call's path, and nothing it does changes a request. Each sweep
takes the outbox's lease (one process at a time), turns the audit rows after the cursor into deliveries
(`proxy.notify.outbox`), then, channel by channel in the log's order, sends what is owed. A channel that
fails waits (exponential back-off, capped) and keeps what it owes, in order, for when it is back; the
others go on. A message a channel refuses for good (HTTP 400, 413, 422; an SMTP 5xx for every
recipient) is kept as failed and the channel's next messages go on. A secret the channel needs that is
not set is a failure like any other: nothing is sent unsigned, and /status says which variable. Each
try is counted by channel (`cedargate_notification_deliveries_total`, `..._failures_total`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import Table, select
from sqlalchemy.engine import Engine as SAEngine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from proxy.cedar.escalation import parse_duration
from proxy.notify.channels import Channel, DeliveryError, url_problem
from proxy.notify.notices import TOLD, Notice, notice_of, parse_payload, route
from proxy.notify.outbox import BackOff, ChannelStatus, DeliveryState, LeaseLost, Outbox, Owed
from proxy.observe import metrics
from proxy.oversight.overrides import Override, aware
from proxy.record.audit import AuditEntry
from proxy.record.store import utcnow
from proxy.settings.config import ApproverCredential
from proxy.settings.notifications import EmailChannel, Notifications, SlackChannel, WebhookChannel

log = logging.getLogger(__name__)

_log: Table = AuditEntry.__table__  # type: ignore[attr-defined]
SWEEP_INTERVAL = 1.0  # seconds between sweeps: how late a notification leaves at the earliest
BATCH = 200  # audit rows read per fan-out transaction
CLOSE_WAIT = 1.0  # seconds `close` waits for a sweep to stop between deliveries before leaving it to lapse
PER_CHANNEL = 100  # deliveries tried per channel per sweep, so the lease is renewed and others get a turn


def build_channels(config: Notifications, approvers: Mapping[str, ApproverCredential],
                   environ: Mapping[str, str] = os.environ) -> dict[str, Channel]:
    from proxy.notify.mail import Email
    from proxy.notify.slack import Slack
    from proxy.notify.webhook import Webhook

    channels: dict[str, Channel] = {}
    for name, channel in config.channels.items():
        if isinstance(channel, WebhookChannel):
            channels[name] = Webhook(name, channel, environ)
        elif isinstance(channel, SlackChannel):
            channels[name] = Slack(name, channel, environ)
        elif isinstance(channel, EmailChannel):
            channels[name] = Email(name, channel, approvers, environ)
    return channels


def missing_variables(config: Notifications, environ: Mapping[str, str] = os.environ) -> list[str]:
    """One line per environment variable a channel names that is not set, or (a URL's) not usable
    (warned at start). A line names the variable, never its value: that may be a secret."""
    missing = []
    for name, channel in config.channels.items():
        for field in ("secret_env", "url_env", "host_env", "username_env", "password_env"):
            variable = getattr(channel, field, None)
            value = environ.get(variable) if variable else None
            if variable and not value:
                missing.append(f"notification channel {name}: environment variable {variable} ({field}) is not set; "
                               "its messages wait until it is")
            elif field == "url_env" and value and (problem := url_problem(value)) is not None:
                missing.append(f"notification channel {name}: environment variable {variable} does not hold a "
                               f"usable URL: {problem}; its messages wait until it does")
    return missing


class Notifier:
    def __init__(self, engine: SAEngine, config: Notifications, approvers: Mapping[str, ApproverCredential],
                 base_url: Callable[[], str], *, environ: Mapping[str, str] = os.environ,
                 channels: Mapping[str, Channel] | None = None) -> None:
        self.outbox = Outbox(engine)
        self.config = config
        self.channels = dict(channels) if channels is not None else build_channels(config, approvers, environ)
        self.base_url = base_url
        self.backoff = BackOff(parse_duration(config.retry_initial), parse_duration(config.retry_max))
        self.max_age = timedelta(seconds=parse_duration(config.max_age))
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        timeouts = [float(getattr(c, "timeout", 10.0)) for c in config.channels.values()]
        self.lease_seconds = max([30.0, *(3 * t for t in timeouts)])
        self._stopping = threading.Event()
        self._sweeping = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether there is anything to sweep for: a route to a channel."""
        return bool(self.channels and self.config.routes)

    def sweep(self) -> None:
        """One round: take the lease, read new events, deliver what is owed. Blocking: run off the loop."""
        if self._stopping.is_set() or not self._sweeping.acquire(blocking=False):
            return
        try:
            if not self.outbox.lease(self.holder, self.lease_seconds):
                return  # another process sweeps
            while self.fan_out() == BATCH and not self._stopping.is_set():
                pass
            self.deliver()
        except LeaseLost as exc:
            log.warning("notifications: %s; another process took over", exc)
        finally:
            self._sweeping.release()

    def close(self) -> None:
        """Stop between two deliveries and give the lease back, so a restarted process sweeps at once;
        never waits more than CLOSE_WAIT for a send under way."""
        self._stopping.set()
        # A send under way ends by its own deadline (the channel's timeout); shutdown does not wait for it.
        if not self._sweeping.acquire(timeout=CLOSE_WAIT):
            log.warning("notifications: a delivery is still under way at shutdown; its lease lapses in %g s",
                        self.lease_seconds)
            return
        try:
            self.outbox.release(self.holder)
        except SQLAlchemyError as exc:
            log.warning("notifications: the sweep's lease was not given back (%s); it lapses in %g s",
                        type(exc).__name__, self.lease_seconds)
        finally:
            self._sweeping.release()

    # --- reading the log ----------------------------------------------------------------------------

    def fan_out(self) -> int:
        """Turn the next audit rows after the cursor into deliveries; returns how many rows were read."""
        now = utcnow()
        with self.outbox.transaction() as conn:
            old = self.outbox.cursor(conn)
            head = conn.execute(select(_log.c.seq).order_by(_log.c.seq.desc()).limit(1)).scalar() or 0
            rows = conn.execute(
                select(_log.c.seq, _log.c.at, _log.c.kind, _log.c.override_id, _log.c.actor, _log.c.payload,
                       _log.c.hash)
                .where(_log.c.seq > old, _log.c.seq <= head, _log.c.kind.in_(list(TOLD)))
                .order_by(_log.c.seq).limit(BATCH)).all()
            new = rows[-1].seq if len(rows) == BATCH else head
            owed = []
            with Session(bind=conn) as session:
                for row in rows:
                    if row.override_id is None or now - aware(row.at) > self.max_age:
                        continue
                    override = session.get(Override, row.override_id)
                    if override is None:
                        continue
                    notice = notice_of(row.seq, row.at, row.kind, parse_payload(row.payload), row.actor, override,
                                       self.link(override.id))
                    for channel in route(notice, self.config.routes):
                        if channel in self.channels:
                            owed.append(_owed(row.seq, row.hash, channel, notice, now))
            if new != old:
                self.outbox.advance(conn, old, new, owed)
        return len(rows)

    def link(self, override_id: str) -> str:
        base = self.config.review_url or self.base_url().rstrip("/")
        return f"{base}/inbox/requests/{override_id}"

    # --- delivering ---------------------------------------------------------------------------------

    def deliver(self) -> None:
        now = utcnow()
        for name in sorted(self.channels):
            retry_at = self.outbox.retry_at(name)
            if retry_at is not None and aware(retry_at) > now:
                continue  # failing: it waits its back-off out, keeping what it owes
            for owed in self.outbox.due(name, PER_CHANNEL):
                if self._stopping.is_set() or not self.outbox.lease(self.holder, self.lease_seconds):
                    return
                if not self._send(self.channels[name], owed):
                    break

    def _send(self, channel: Channel, owed: Owed) -> bool:
        """One try; False when the channel failed and should wait before its next message."""
        try:
            channel.send(Notice.from_dict(owed.notice), owed.key)
        except DeliveryError as exc:
            if exc.permanent:
                log.warning("notification %s (%s of audit row %d) refused for good by %s: %s", owed.key, owed.kind,
                            owed.seq, channel.name, exc)
                self.outbox.refused(owed, str(exc))
                metrics.notification_failed(channel.name, refused=True)
                return True
            metrics.notification_failed(channel.name, refused=False)
            retry = self.outbox.failed(owed, str(exc), self.backoff)
            log.warning("notification channel %s failed (%s); it is tried again at %s, keeping what it owes",
                        channel.name, exc, retry.isoformat(timespec="seconds"))
            return False
        except Exception as exc:  # a defect in a channel must not stop the others, nor lose the message
            log.exception("notification channel %s failed unexpectedly", channel.name)
            metrics.notification_failed(channel.name, refused=False)
            self.outbox.failed(owed, f"internal error: {type(exc).__name__}", self.backoff)
            return False
        self.outbox.delivered(owed)
        metrics.notification_delivered(channel.name)
        return True

    def status(self) -> list[ChannelStatus]:
        return self.outbox.status(sorted(self.config.channels))


def idempotency_key(audit_hash: str, channel: str) -> str:
    """Stable for one event and channel across tries and restarts; distinct across databases (the hash
    covers the whole chain before it)."""
    return hashlib.sha256(f"{audit_hash}:{channel}".encode()).hexdigest()[:40]


def _owed(seq: int, audit_hash: str, channel: str, notice: Notice, now: datetime) -> dict[str, object]:
    return {"seq": seq, "channel": channel, "key": idempotency_key(audit_hash, channel), "kind": notice.kind,
            "override_id": notice.override_id, "notice": json.dumps(notice.as_dict(), ensure_ascii=False),
            "state": DeliveryState.PENDING, "attempts": 0, "created_at": now}
