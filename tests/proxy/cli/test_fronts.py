"""What `cedargate run` and `mitmdump -s addons/enforcer.py` compose alike (`proxy.cli.fronts`)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from proxy.cli.fronts import bind_api, check_loopback, mitmproxy_options
from proxy.settings.config import ConfigError, Listen, Settings


def test_a_non_loopback_address_is_refused_unless_allowed_and_then_warned_about(caplog):
    check_loopback("API", "127.0.0.1", False, "pass --allow-non-loopback")
    check_loopback("API", "::1", False, "pass --allow-non-loopback")
    refused = (r"^refusing to bind the API to non-loopback address 0\.0\.0\.0: "
               r".*; set allow_non_loopback: true in cedargate_config to mean it$")
    with pytest.raises(ConfigError, match=refused):
        check_loopback("API", "0.0.0.0", False, "set allow_non_loopback: true in cedargate_config")
    with caplog.at_level(logging.WARNING):
        check_loopback("proxy", "0.0.0.0", True, "pass --allow-non-loopback")
    assert "the proxy listens on non-loopback address 0.0.0.0" in caplog.text


def test_mitmproxy_keeps_its_ca_in_the_state_dir_and_decides_before_connecting(tmp_path: Path):
    options = mitmproxy_options(Settings(state_dir=tmp_path / "state"))
    assert options == {"confdir": str(tmp_path / "state"), "connection_strategy": "lazy", "rawtcp": False}
    bundle = tmp_path / "private-ca.pem"
    with_bundle = mitmproxy_options(Settings(upstream_ca_bundle=bundle))
    assert with_bundle["ssl_verify_upstream_trusted_ca"] == str(bundle)


def test_a_taken_api_port_is_an_error_naming_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^the override API cannot listen on 127\.0\.0\.1:{port}: "
                                              r"Address already in use; set api\.port"):
            bind_api(Settings(api=Listen(port=port)))


def test_port_0_binds_a_free_loopback_port():
    sock = bind_api(Settings(api=Listen(port=0)))
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
    finally:
        sock.close()
