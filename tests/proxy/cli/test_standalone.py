"""`mitmdump -s addons/enforcer.py`'s composition (`proxy.cli.standalone`), under mitmproxy's test master.

The real subprocess is in tests/addons/test_mitmdump_script.py; here, which mitmproxy options the script
sets from cedargate's settings, and which it leaves as the command line set them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mitmproxy import exceptions
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons

from addons.enforcer import Enforcer
from proxy.cli.standalone import standalone_addons


@pytest.fixture
def config(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no ./policies or ./.cedargate of the repository's to fall back on
    path = tmp_path / "cedargate.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "policy_reload_interval": 0,
                                    "proxy": {"port": 18080}}))
    return path


class Script:
    """As mitmdump registers the script: one addon whose `addons` are loaded before any is configured."""

    def __init__(self, addons: list) -> None:
        self.addons = addons


@pytest.fixture
def script() -> Iterator[Script]:
    addons = standalone_addons()
    yield Script(addons)
    next(a for a in addons if isinstance(a, Enforcer)).done()


def test_the_proxy_listens_on_loopback_with_its_ca_in_the_state_dir(script, config, policy_dir, tmp_path):
    with taddons.context(Proxyserver(), script) as tctx:
        tctx.options.update(cedargate_config=str(config), cedargate_policy_dir=str(policy_dir))
        options = tctx.options
        assert (options.listen_host, options.listen_port) == ("127.0.0.1", 18080)
        assert options.confdir == str(tmp_path / "state")
        assert (options.connection_strategy, options.rawtcp) == ("lazy", False)


def test_what_the_command_line_chose_is_kept(script, config, policy_dir, tmp_path):
    with taddons.context(Proxyserver(), script) as tctx:
        # As `mitmdump --listen-host 0.0.0.0 --listen-port 9999 --set confdir=...` sets them, first.
        tctx.options.update(listen_host="0.0.0.0", listen_port=9999, confdir=str(tmp_path / "mine"))
        tctx.options.update(cedargate_config=str(config), cedargate_policy_dir=str(policy_dir))
        options = tctx.options
        assert (options.listen_host, options.listen_port, options.confdir) == (
            "0.0.0.0", 9999, str(tmp_path / "mine"))


def test_a_non_loopback_api_is_refused_unless_the_config_allows_it(script, config, policy_dir):
    with taddons.context(Proxyserver(), script) as tctx:
        refused = r"^refusing to bind the API to non-loopback address 0\.0\.0\.0: .*allow_non_loopback: true"
        with pytest.raises(exceptions.OptionsError, match=refused):
            tctx.options.update(cedargate_config=str(config), cedargate_policy_dir=str(policy_dir),
                                cedargate_api_host="0.0.0.0")
