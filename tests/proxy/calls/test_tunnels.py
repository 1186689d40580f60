"""What a CONNECT tunnel may carry: the request target, the TLS server name and passthrough, as the core decides."""

from __future__ import annotations

from dataclasses import replace

import pytest
from proxy_support import make_call

from proxy.calls.mapping import MappingError, MappingOptions, map_call
from proxy.calls.tunnels import (
    Passthrough,
    authority_of,
    server_name_problem,
    split_authority,
    target_problem,
)


@pytest.mark.parametrize("authority, expected", [
    ("localhost:8080", ("localhost", 8080)),
    ("localhost", ("localhost", None)),
    ("[::1]:443", ("::1", 443)),
    ("[::1]", ("::1", None)),
    ("127.0.0.1:80", ("127.0.0.1", 80)),
])
def test_split_authority(authority, expected):
    assert split_authority(authority) == expected


def test_split_authority_refuses_a_port_that_is_not_a_number():
    with pytest.raises(ValueError):
        split_authority("localhost:http")


@pytest.mark.parametrize("scheme, host, port, expected", [
    ("http", "localhost", 80, "localhost"),
    ("https", "localhost", 443, "localhost"),
    ("http", "localhost", 443, "localhost:443"),
    ("https", "::1", 8443, "[::1]:8443"),
])
def test_authority_of_leaves_out_the_default_port(scheme, host, port, expected):
    assert authority_of(scheme, host, port) == expected


@pytest.mark.parametrize("authority, scheme, port", [
    ("localhost:8080", "http", 8080),
    ("LOCALHOST:8080", "http", 8080),
    ("localhost.:8080", "http", 8080),
    ("localhost", "https", 443),
    ("localhost:443", "https", 443),
])
def test_a_target_naming_the_tunnel_passes(authority, scheme, port):
    assert target_problem(authority, scheme, "localhost", port) is None


@pytest.mark.parametrize("authority, scheme, port", [
    ("127.0.0.1:8080", "http", 8080),  # nginx would route this to its default (production) vhost
    ("localhost:9090", "http", 8080),  # another port
    ("localhost", "http", 8080),  # the default port, not the tunnel's
    ("prod.example", "https", 443),
    ("localhost:x", "http", 8080),
])
def test_a_target_naming_another_authority_is_a_problem(authority, scheme, port):
    problem = target_problem(authority, scheme, "localhost", port)
    assert problem is not None
    assert repr(authority) in problem and "origin-form" in problem


def test_the_address_spelled_otherwise_is_the_same_host():
    assert target_problem("127.1:8080", "http", "127.0.0.1", 8080) is None
    assert target_problem("[::ffff:127.0.0.1]:8080", "http", "127.0.0.1", 8080) is None


@pytest.mark.parametrize("server_name, host", [
    (None, "127.0.0.1"),  # a client connecting to an address sends no SNI
    (None, "localhost"),
    ("localhost", "localhost"),
    ("LocalHost.", "localhost"),
])
def test_a_server_name_naming_the_tunnel_host_or_none_passes(server_name, host):
    assert server_name_problem(server_name, host) is None


def test_a_server_name_naming_another_host_is_a_problem():
    problem = server_name_problem("prod.internal", "localhost")
    assert problem is not None and "'prod.internal'" in problem and "'localhost'" in problem


def test_passthrough_is_decided_on_the_connect_authority_written_host_port():
    passthrough = Passthrough([r"^pinned\.example:443$", r".*\.bank\.test"])
    assert passthrough.covers("pinned.example", 443)
    assert passthrough.covers("Pinned.Example.", 443)  # canonical form: the same host
    assert not passthrough.covers("pinned.example", 8443)
    assert passthrough.covers("api.bank.test", 8443)
    assert not passthrough.covers("localhost", 443)
    # A pattern matches the whole host (or host:port), never a part: the agent chooses the host.
    assert not passthrough.covers("api.bank.test.attacker.test", 443)
    assert not Passthrough([r"pinned\.example"]).covers("pinned.example.attacker.test", 443)
    assert Passthrough([r"pinned\.example"]).covers("pinned.example", 443)
    assert not Passthrough([])


def test_passthrough_admits_only_an_sni_naming_the_connect_host():
    passthrough = Passthrough([r"pinned\.example", r"10\.0\.0\.5:\d+"])
    assert passthrough.admits("pinned.example", 443, "pinned.example")
    assert passthrough.admits("pinned.example", 443, "PINNED.example")
    # Another name: a front at that address could route it to another backend.
    assert not passthrough.admits("pinned.example", 443, "internal.example")
    # No name to a name: the front would pick its default backend.
    assert not passthrough.admits("pinned.example", 443, None)
    # No name to an address: what a client connecting by IP sends.
    assert passthrough.admits("10.0.0.5", 443, None)
    # A listed name in the SNI does not open a tunnel to a host that is not listed.
    assert not passthrough.admits("localhost", 443, "pinned.example")


def _tunnelled(url: str = "http://localhost:8080/v1/instances", **fields):
    return replace(make_call("GET", url), **fields)


def test_the_mapping_refuses_an_absolute_form_target_naming_another_host_than_the_tunnel():
    with pytest.raises(MappingError) as refused:
        map_call(_tunnelled(target_authority="127.0.0.1:8080"), MappingOptions())
    assert refused.value.status == 400
    assert "'127.0.0.1:8080'" in str(refused.value) and "'localhost:8080'" in str(refused.value)


def test_the_mapping_maps_an_absolute_form_target_naming_the_tunnel():
    request = map_call(_tunnelled(target_authority="localhost:8080"), MappingOptions())
    assert request.resource == ("Host", "localhost")


def test_the_mapping_refuses_a_server_name_naming_another_host_with_421():
    with pytest.raises(MappingError) as refused:
        map_call(_tunnelled("https://localhost/v1/instances", server_name="prod.internal"), MappingOptions())
    assert refused.value.status == 421
    assert "prod.internal" in str(refused.value)


def test_the_mapping_maps_a_call_with_its_own_server_name_or_none():
    for server_name in ("localhost", None):
        request = map_call(_tunnelled("https://localhost/v1/instances", server_name=server_name), MappingOptions())
        assert request.resource == ("Host", "localhost")


@pytest.mark.parametrize("host_header", ["", "  "])
def test_the_mapping_refuses_an_empty_host_header(host_header):
    with pytest.raises(MappingError, match="the Host header is empty"):
        map_call(_tunnelled(host_header=host_header), MappingOptions())
