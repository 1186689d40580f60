"""cedargate's settings: a YAML file parsed into pydantic models, with command-line flags on top.

Every value has a safe default, so `cedargate run --policy-dir policies/` works without a file.
A bad value raises `ConfigError` with the field's path and what was wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.calls.redaction import DEFAULT_SECRET_QUERY_PARAMS
from proxy.settings.notifications import Notifications, check_address
from proxy.vocabulary.hosts import is_loopback


class ConfigError(Exception):
    """The configuration cannot be used; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)

    @property
    def is_loopback(self) -> bool:
        return is_loopback(self.host)


class AgentCredential(_Strict):
    """One agent's proxy credential: a SHA-256 hash of its token, or the name of a variable holding it."""

    token_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    token_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> AgentCredential:
        if (self.token_sha256 is None) == (self.token_env is None):
            raise ValueError("give exactly one of token_sha256 (see `cedargate hash-token`) or token_env")
        return self


class ApproverCredential(AgentCredential):
    """A human reviewer: a bearer token (hashed, or from a variable) and the roles they hold."""

    roles: tuple[str, ...] = Field(min_length=1)
    email: str | None = Field(None, description="where email notifications for their roles go (see notifications)")

    @field_validator("email")
    @classmethod
    def _email(cls, address: str | None) -> str | None:
        return None if address is None else check_address(address)


class Settings(_Strict):
    proxy: Listen = Listen()
    api: Listen = Listen(port=8081)
    allow_non_loopback: bool = False
    workers: int = Field(
        1, ge=1, le=256,
        description="proxy processes serving the proxy's port, so every core of the machine works; with more "
                    "than 1, one more process runs the override API and the core's jobs. All share the store",
    )
    policy_dir: Path = Path("policies")
    policy_reload_interval: float = Field(1.0, ge=0, description="seconds between policy checks; 0 = off")
    state_dir: Path = Path(".cedargate")
    database_url: str | None = None
    agents: dict[str, AgentCredential] = {}
    approvers: dict[str, ApproverCredential] = {}
    hold_max_wait: float = Field(
        55.0, ge=0, description="longest a held call waits for a human: a duration (55s, 2m) or seconds",
    )
    override_expiry: str = Field("1h", description="default time a pending override request stays open")
    grant_ttl: str = Field("10m", description="time an unused grant stays valid")
    review_session_idle: str = Field(
        "30m", description="a reviewer's signed-in browser session ends when unused this long")
    review_session_max_age: str = Field(
        "12h", description="a reviewer's browser session ends this long after sign-in, however much it is used")
    context_headers: tuple[str, ...] = ("content-type", "user-agent", "accept")
    max_body_bytes: int = Field(
        64 * 1024, ge=0,
        description="largest JSON body read for the policy (context.body); a larger JSON body is refused "
                    "with 413 after it arrived. At most max_request_body_bytes",
    )
    max_request_body_bytes: int = Field(
        10 * 1024 * 1024, ge=1,
        description="largest request body the proxy accepts, of any type; a larger one is refused with 413 "
                    "before it is read into memory (as its Content-Length announces it, or as it streams in)",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024,
        description="largest request head (request line and headers) the proxy and the API read; a longer "
                    "one is refused (431 from the proxy, 400 from the API) before it is buffered further",
    )
    header_read_timeout: float = Field(
        10.0, gt=0,
        description="seconds a new connection to the proxy or the API has to send a complete request head "
                    "(on the proxy: with valid credentials); then it is closed. Bounds slow or silent "
                    "clients",
    )
    idle_timeout: float = Field(
        60.0, gt=0,
        description="seconds a kept-alive connection to the proxy or the API may wait for its next request "
                    "head after an answer; then it is closed",
    )
    max_unauthenticated_connections: int | None = Field(
        None, ge=1,
        description="connections kept open at once, per front, that have not (yet) authenticated: on the "
                    "proxy, no valid Proxy-Authorization; on the API, none with a request in progress. A new "
                    "one past the cap closes the oldest. Default: a quarter of the open-file limit",
    )
    max_proxy_connections: int | None = Field(
        None, ge=1,
        description="connections one proxy process keeps open at once, agents' and upstream ones together; a "
                    "new agent connection past it is answered 503 proxy-saturated with Retry-After. Default: "
                    "from the open-file limit, leaving a quarter for the API and some for the store",
    )
    max_held_calls: int | None = Field(
        None, ge=1,
        description="calls one proxy process holds for review at once; past it, an escalation's override "
                    "request is opened and the agent answered at once (as with Prefer: respond-async). "
                    "Default: two thirds of max_proxy_connections",
    )
    max_mcp_event_bytes: int = Field(
        1024 * 1024, ge=1024,
        description="largest event an MCP server may send on an event stream, bytes; each event is checked "
                    "whole, so a larger one ends the stream with a JSON-RPC error instead of being passed on",
    )
    max_mcp_answer_bytes: int = Field(
        16 * 1024 * 1024, ge=1024,
        description="largest whole (not streamed) MCP answer, bytes once its content coding is decoded; a "
                    "larger one (a decompression bomb, say) gets the agent a 502 problem instead",
    )
    upstream_ca_bundle: Path | None = Field(
        None, description="PEM bundle of CAs trusted for upstream TLS besides the system's (private CAs)"
    )
    upstream_connect_timeout: float = Field(
        10.0, gt=0, description="longest wait, seconds, to connect to an upstream (TCP and TLS); then the "
        "agent gets 504 upstream-timeout, and the call was not sent",
    )
    upstream_read_timeout: float = Field(
        60.0, gt=0, description="longest wait, seconds, for an upstream's answer once the call was sent, and "
        "again for the rest of an answer after its headers (an MCP event stream is not bounded once it "
        "started); then the agent gets 504 upstream-timeout. A held call's wait for a human is not counted",
    )
    passthrough_hosts: tuple[str, ...] = Field(
        (), description="regexes each matching a tunnel's whole CONNECT host or host:port; a TLS tunnel whose "
        "CONNECT matches (and whose SNI names the same host) is relayed uninspected, recorded as a passthrough event"
    )
    max_pending_overrides_per_agent: int = Field(
        20, ge=1, description="override requests one agent may have waiting for review; past it, 429"
    )
    override_rate: int = Field(
        10, ge=1, description="new override requests one agent may open a minute (a token bucket: bursts of "
        "up to this many); past it, 429 with Retry-After"
    )
    max_override_body_bytes: int = Field(
        64 * 1024, ge=0, description="largest body an escalated call may carry: it is stored whole for its "
        "reviewers, so a larger one is refused (413) rather than escalated"
    )
    secret_query_params: tuple[str, ...] = Field(
        DEFAULT_SECRET_QUERY_PARAMS, description="query parameters (names, any case) whose values are "
        "redacted in the record, the logs and every view, as secret headers are"
    )
    shadow_policy_dir: Path | None = Field(
        None, description="a second policy directory evaluated beside policy_dir on every call and never "
        "enforced; where its decision differs from the live one, the disagreement is recorded and counted"
    )
    cedar_request_retention: str = Field(
        "30d", description="how long each decision keeps the Cedar request it was made on (secrets redacted), "
        "for `cedargate replay` and explaining it later; then a background job clears it (the decision stays)"
    )
    notifications: Notifications = Field(
        Notifications(), description="channels (webhook, Slack, email) and routes telling reviewers of requests")
    time_zone: str = Field(
        "UTC", description="the time zone (IANA name, e.g. Europe/Berlin) of context.local, the wall clock "
        "policies read for office hours; context.time is always UTC"
    )
    auditor_role: str = Field(
        "auditor", min_length=1, description="approvers holding this role see every override request (others "
        "only those their roles can decide); it gives no vote"
    )

    @model_validator(mode="after")
    def _body_limits(self) -> Settings:
        if self.max_body_bytes > self.max_request_body_bytes:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) exceeds max_request_body_bytes "
                f"({self.max_request_body_bytes}): no body that large reaches the policy; raise "
                "max_request_body_bytes or lower max_body_bytes"
            )
        return self

    @model_validator(mode="after")
    def _ceilings(self) -> Settings:
        if self.max_held_calls and self.max_proxy_connections and self.max_held_calls > self.max_proxy_connections:
            raise ValueError(
                f"max_held_calls ({self.max_held_calls}) exceeds max_proxy_connections "
                f"({self.max_proxy_connections}): every held call keeps its connection open; lower "
                "max_held_calls or raise max_proxy_connections"
            )
        return self

    @field_validator("agents")
    @classmethod
    def _agent_ids(cls, agents: dict[str, AgentCredential]) -> dict[str, AgentCredential]:
        for agent_id in agents:
            if not agent_id or ":" in agent_id or any(c.isspace() for c in agent_id):
                raise ValueError(f"agent id {agent_id!r} must be non-empty, without ':' or spaces")
        return agents

    @field_validator("passthrough_hosts")
    @classmethod
    def _regexes(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        import re

        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns

    @field_validator("hold_max_wait", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        # Written like the other durations in the file ("55s", "2m"); a bare number is seconds, as before.
        if isinstance(value, str) and not value.strip().replace(".", "", 1).isdigit():
            from proxy.cedar.escalation import parse_duration

            return parse_duration(value)
        return value

    @field_validator("override_expiry", "grant_ttl", "review_session_idle", "review_session_max_age",
                     "cedar_request_retention")
    @classmethod
    def _duration(cls, value: str) -> str:
        from proxy.cedar.escalation import parse_duration

        parse_duration(value)
        return value

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, name: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"{name!r} is not a time zone this machine knows; give an IANA name such as "
                             "Europe/Berlin or America/New_York, or UTC") from None
        return name

    @field_validator("context_headers", "secret_query_params")
    @classmethod
    def _lower(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.lower() for h in names)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'cedargate.db'}"


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Read the YAML file (if any), apply `overrides` (dotted keys, e.g. "proxy.port"), validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot be read: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path}: is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: must be a mapping of settings")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        target = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            if target.get(key) is None:  # `proxy:` with its keys commented out is an empty section
                target[key] = {}
            target = target[key]
            if not isinstance(target, dict):
                raise ConfigError(f"config file {path}: `{key}` must be a mapping to set `{dotted}` from a flag")
        target[leaf] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        where = f"config file {path}" if path else "settings"
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{where} has bad values:\n" + "\n".join(lines)) from exc
