"""The `notifications:` section of cedargate.yaml: the channels humans are told through, which events go
to which of them for which roles, and how deliveries are retried. Plain pydantic models; what they
configure lives in `proxy.notify`.

Secrets never appear in the file: a webhook's signing secret, a Slack incoming-webhook URL (which is a
secret: whoever has it may post) and SMTP credentials are named by the environment variables holding
them, read when a message is sent. A bad value (a route naming an unknown channel, a URL that is not
http(s), an environment variable name that is not one) is refused at load, with its path in the file.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ADDRESS = re.compile(r"^[^@\s<>,;\"']+@[^@\s<>,;\"']+$")


class NoticeKind(StrEnum):
    """The events of a request's life a human may be told of; the values are what routes name."""

    OPENED = "opened"  # a request is waiting for review
    REMINDER = "reminder"  # still waiting: its tier's time is running out
    ESCALATED = "escalated"  # nobody answered in time: the next tier is asked
    INFO_REQUESTED = "info_requested"  # a reviewer asked the agent a question
    GRANTED = "granted"
    DENIED = "denied"
    EXPIRED = "expired"  # nobody decided in time: it was rejected


# What a route may name: each kind, and "decided" for both granted and denied.
ROUTE_EVENTS = {**{kind.value: (kind,) for kind in NoticeKind}, "decided": (NoticeKind.GRANTED, NoticeKind.DENIED)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_url(url: str) -> str:
    # Worded without the URL's path and query: a Slack URL is a secret, and a webhook's may carry a token.
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("the URL holds a space or a control character")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the URL ({parts.scheme or 'no scheme'}://{parts.hostname or 'no host'}...) is not an "
                         "http(s) URL with a host")
    return url


class WebhookChannel(_Strict):
    """A JSON POST to `url`, signed with HMAC-SHA256 under the secret in `secret_env` (see README)."""

    type: Literal["webhook"]
    url: str
    secret_env: str = Field(pattern=ENV_NAME, description="the variable holding the signing secret")
    timeout: float = Field(10.0, gt=0, le=120, description="seconds to connect and to get the answer")

    _url = field_validator("url")(check_url)


class SlackChannel(_Strict):
    """A Block Kit message to a Slack incoming webhook; its URL is a secret, so best given by variable."""

    type: Literal["slack"]
    url: str | None = None
    url_env: str | None = Field(None, pattern=ENV_NAME)
    timeout: float = Field(10.0, gt=0, le=120)

    @field_validator("url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        return None if url is None else check_url(url)

    @model_validator(mode="after")
    def _one_source(self) -> SlackChannel:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give exactly one of url and url_env (the variable holding the incoming-webhook URL)")
        return self


class EmailChannel(_Strict):
    """Mail over SMTP to the approvers concerned who have an `email`, and to the fixed addresses `to`."""

    type: Literal["email"]
    sender: str = Field(alias="from", description="the From address")
    to: tuple[str, ...] = Field((), description="addresses that get every message of this channel")
    host: str | None = None
    host_env: str | None = Field(None, pattern=ENV_NAME)
    port: int = Field(587, ge=1, le=65535)
    starttls: bool = Field(True, description="upgrade the connection with STARTTLS before sending (and "
                                             "before any login); false only for a relay on loopback")
    username_env: str | None = Field(None, pattern=ENV_NAME)
    password_env: str | None = Field(None, pattern=ENV_NAME)
    timeout: float = Field(10.0, gt=0, le=120)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("sender")
    @classmethod
    def _sender(cls, address: str) -> str:
        return check_address(address)

    @field_validator("to")
    @classmethod
    def _to(cls, addresses: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_address(a) for a in addresses)

    @model_validator(mode="after")
    def _server(self) -> EmailChannel:
        if (self.host is None) == (self.host_env is None):
            raise ValueError("give exactly one of host and host_env (the variable holding the SMTP server's name)")
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("give both username_env and password_env, or neither (no SMTP login)")
        return self


def check_address(address: str) -> str:
    if not _ADDRESS.match(address):
        raise ValueError(f"{address!r} is not an email address (name@domain, nothing else)")
    return address


Channel = Annotated[WebhookChannel | SlackChannel | EmailChannel, Field(discriminator="type")]


class Route(_Strict):
    """Events of these kinds, about requests needing any of these roles, go to these channels."""

    events: tuple[str, ...] = Field(min_length=1)
    roles: tuple[str, ...] = Field((), description="empty: requests needing any role")
    channels: tuple[str, ...] = Field(min_length=1)

    @field_validator("events")
    @classmethod
    def _events(cls, events: tuple[str, ...]) -> tuple[str, ...]:
        for event in events:
            if event not in ROUTE_EVENTS:
                raise ValueError(f"unknown event {event!r}; the events are {', '.join(ROUTE_EVENTS)}")
        return events

    @property
    def kinds(self) -> frozenset[NoticeKind]:
        return frozenset(kind for event in self.events for kind in ROUTE_EVENTS[event])


class Notifications(_Strict):
    review_url: str | None = Field(
        default=None, description="the review page's public base URL (https://cedargate.example.com): messages link to "
        "{review_url}/inbox/requests/{id}. Default: the API's own address")
    channels: dict[str, Channel] = {}
    routes: tuple[Route, ...] = ()
    retry_initial: str = Field(default="2s", description="first wait after a failed delivery; doubled each time")
    retry_max: str = Field(default="5m", description="longest wait between two tries of a channel that is down")
    max_age: str = Field(
        default="1d", description="events older than this when first read are not sent (a backlog from before "
        "notifications were configured, or a long outage of cedargate itself); a channel that is down "
        "keeps what it already owes however long")

    @field_validator("review_url")
    @classmethod
    def _review_url(cls, url: str | None) -> str | None:
        return None if url is None else check_url(url).rstrip("/")

    @field_validator("retry_initial", "retry_max", "max_age")
    @classmethod
    def _duration(cls, value: str) -> str:
        from proxy.cedar.escalation import parse_duration

        parse_duration(value)
        return value

    @field_validator("channels")
    @classmethod
    def _names(cls, channels: dict[str, Channel]) -> dict[str, Channel]:
        for name in channels:
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name):
                raise ValueError(f"channel name {name!r}: letters, digits, '_', '.', '-', at most 64")
        return channels

    @model_validator(mode="after")
    def _routes_name_channels(self) -> Notifications:
        for number, route in enumerate(self.routes):
            unknown = [name for name in route.channels if name not in self.channels]
            if unknown:
                known = ", ".join(sorted(self.channels)) or "none are configured"
                raise ValueError(f"routes[{number}] names unknown channel(s) {', '.join(unknown)} (channels: {known})")
        return self
