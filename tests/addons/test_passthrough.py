"""The passthrough addon: which TLS tunnels are relayed uninspected, decided on the CONNECT authority alone.

Real ClientHellos (made by Python's ssl for the SNI under test) in mitmproxy's own `tls_clienthello`
event data, a real `Runtime` with `passthrough_hosts`, and the audit log read back from its file.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from addon_support import AGENT, TOKEN_SHA256, make_flow
from mitmproxy import connection, exceptions, tls
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.tls import parse_client_hello
from mitmproxy.test import taddons, tflow

from addons.passthrough import Passthrough
from proxy.runtime import Runtime
from proxy.settings.config import AgentCredential, Settings


@pytest.fixture
def passthrough_runtime(tmp_path: Path, policy_dir: Path) -> Iterator[Runtime]:
    settings = Settings(
        policy_dir=policy_dir, state_dir=tmp_path / "state", policy_reload_interval=0,
        agents={AGENT: AgentCredential(token_sha256=TOKEN_SHA256)},
        passthrough_hosts=(r"^pinned\.example:443$", r"10\.0\.0\.5"),
    )
    started = Runtime.start(settings)
    yield started
    started.close()


def client_hello(server_name: str | None) -> tls.ClientHello:
    """The ClientHello a Python client sends for `server_name` (None: no SNI)."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = parse_client_hello(outgoing.read())
    assert hello is not None
    return hello


def hello_in_tunnel(tctx, address: tuple[str, int] | None, server_name: str | None,
                    client: connection.Client | None = None) -> tls.ClientHelloData:
    context = Context(client or tflow.tclient_conn(), tctx.options)
    context.server = connection.Server(address=address)
    return tls.ClientHelloData(context, client_hello(server_name))


def passthrough_events(runtime: Runtime) -> list[dict]:
    assert runtime.recorder.flush()
    with sqlite3.connect(runtime.settings.state_dir / "cedargate.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM audit_log WHERE kind = 'passthrough' ORDER BY seq")]


def test_a_listed_connect_with_its_own_sni_is_passed_through_and_recorded(passthrough_runtime):
    addon = Passthrough(lambda: passthrough_runtime)
    with taddons.context(addon) as tctx:
        connect = make_flow("CONNECT", "http://pinned.example:443/")
        connect.metadata["cedargate.agent"] = AGENT
        addon.http_connected(connect)
        data = hello_in_tunnel(tctx, ("pinned.example", 443), "pinned.example", client=connect.client_conn)
        asyncio.run(addon.tls_clienthello(data))
    assert data.ignore_connection
    [event] = passthrough_events(passthrough_runtime)
    assert event["agent"] == AGENT
    assert json.loads(event["payload"]) == {"host": "pinned.example", "port": 443, "server_name": "pinned.example"}


@pytest.mark.parametrize("address, server_name", [
    (("localhost", 443), "pinned.example"),  # the listed host only in the SNI
    (("pinned.example", 443), "internal.example"),  # a listed CONNECT, another name in the SNI
    (("pinned.example", 443), None),  # to a name without SNI: the front picks its default backend
    (("pinned.example", 8443), "pinned.example"),  # another port than the one listed
    (None, "pinned.example"),  # TLS to the proxy itself, no tunnel
])
def test_anything_else_is_intercepted_and_not_recorded_as_passed_through(passthrough_runtime, address, server_name):
    addon = Passthrough(lambda: passthrough_runtime)
    with taddons.context(addon) as tctx:
        data = hello_in_tunnel(tctx, address, server_name)
        asyncio.run(addon.tls_clienthello(data))
    assert not data.ignore_connection
    assert passthrough_events(passthrough_runtime) == []


def test_a_listed_address_without_sni_is_passed_through(passthrough_runtime):
    addon = Passthrough(lambda: passthrough_runtime)
    with taddons.context(addon) as tctx:
        data = hello_in_tunnel(tctx, ("10.0.0.5", 443), None)
        asyncio.run(addon.tls_clienthello(data))
    assert data.ignore_connection


def test_nothing_is_passed_through_before_the_core_runs():
    addon = Passthrough(lambda: None)
    with taddons.context(addon) as tctx:
        data = hello_in_tunnel(tctx, ("pinned.example", 443), "pinned.example")
        asyncio.run(addon.tls_clienthello(data))
    assert not data.ignore_connection


@pytest.mark.parametrize("option", ["ignore_hosts", "allow_hosts"])
def test_mitmproxys_own_host_lists_are_refused(option):
    addon = Passthrough(lambda: None)
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match=f"Unset {option} and list the hosts in passthrough_hosts"):
            tctx.configure(addon, **{option: ["pinned.example"]})
