"""Agent authentication with standard proxy credentials (`http://AGENT:TOKEN@proxy`).

Modelled on mitmproxy's own proxyauth addon: a CONNECT authenticates the client connection for every
request tunnelled through it; a plain HTTP request authenticates itself. Missing or wrong credentials
get 407 with `Proxy-Authenticate`. The credential header is removed before anything goes upstream.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import weakref
from collections.abc import MutableMapping

from mitmproxy import connection, http

from addons.options import add_options, settings_from_options
from proxy.settings.agents import AgentDirectory
from proxy.vocabulary.problems import MEDIA_TYPE, Problem, problem_document

log = logging.getLogger(__name__)

AGENT = "cedargate.agent"
REALM = "cedargate"


class AgentAuth:
    def __init__(self, directory: AgentDirectory | None = None) -> None:
        self._given = directory is not None
        self.directory = directory
        self.authenticated: MutableMapping[connection.Client, str] = weakref.WeakKeyDictionary()

    def load(self, loader) -> None:
        add_options(loader)

    def configure(self, updated: set[str]) -> None:
        if not self._given and (self.directory is None or "cedargate_config" in updated):
            self.directory = AgentDirectory(settings_from_options().agents)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        agent = self._authenticate(flow)
        if agent:
            self.authenticated[flow.client_conn] = agent

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        agent = self.authenticated.get(flow.client_conn)
        if agent:
            flow.metadata[AGENT] = agent
            # A tunnelled request carries no proxy credential of its own; drop one if sent anyway.
            take_credentials(flow.request.headers)
        else:
            self._authenticate(flow)

    def _authenticate(self, flow: http.HTTPFlow) -> str | None:
        try:
            credentials = parse_basic(take_credentials(flow.request.headers))
            valid = bool(credentials and self.directory and self.directory.verify(*credentials))
        except Exception:  # mitmproxy would answer a CONNECT whose hook raised with 200: refuse instead
            log.exception("proxy authentication failed unexpectedly")
            credentials, valid = None, False
        if credentials and valid:
            flow.metadata[AGENT] = credentials[0]
            return credentials[0]
        log.info("proxy authentication failed from %s", flow.client_conn.peername)
        flow.response = proxy_auth_required("missing" if credentials is None else "invalid")
        return None


_CREDENTIALS = b"proxy-authorization"


def take_credentials(headers: http.Headers) -> str:
    """`headers.pop("Proxy-Authorization", "")` in one pass over the fields: every field of that name
    (in any case) removed, their values joined with ", ". Through its Mapping interface `http.Headers`
    scanned the fields four times, lower-casing every name each time."""
    fields = headers.fields
    values = [value for name, value in fields if name.lower() == _CREDENTIALS]
    if not values:
        return ""
    headers.fields = tuple(field for field in fields if field[0].lower() != _CREDENTIALS)
    return ", ".join(value.decode("utf-8", "surrogateescape") for value in values)


def parse_basic(value: str) -> tuple[str, str] | None:
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):  # ValueError: non-ASCII base64
        return None
    agent, sep, token = decoded.partition(":")
    return (agent, token) if sep and agent else None


def proxy_auth_required(which: str) -> http.Response:
    body = problem_document(
        Problem.PROXY_AUTH_REQUIRED,
        detail=f"{which} proxy credentials: route calls through http://AGENT_ID:TOKEN@<proxy host>:<port>",
    )
    return http.Response.make(
        407, json.dumps(body), {"Proxy-Authenticate": f'Basic realm="{REALM}"', "Content-Type": MEDIA_TYPE},
    )


addons = [AgentAuth()]
