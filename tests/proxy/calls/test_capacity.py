"""The saturation ceilings: derived from the open-file limit with room for the API and the store, or set."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.calls.capacity import Capacity, default_ceilings
from proxy.settings.config import ConfigError, load_settings


@pytest.mark.parametrize("files", [256, 1024, 20_000, 65_536])
def test_derived_ceilings_leave_files_for_the_api_and_the_store(files: int):
    connections, held = default_ceilings(files)
    # The API's idle connections are capped at a quarter of the files by default: that quarter stays free.
    assert connections + files // 4 + 64 <= files
    assert held < connections  # held calls never take every connection: allowed calls still get one


def test_a_configured_ceiling_wins_and_held_calls_never_exceed_connections():
    assert (Capacity.of(20_000, 100, 7).max_connections, Capacity.of(20_000, 100, 7).max_held) == (100, 7)
    assert Capacity.of(20_000, 50).max_held == 50  # the derived 9,733 is capped by the connections


def test_connections_count_agents_and_upstreams_against_one_ceiling():
    capacity = Capacity.of(1024, max_connections=3)
    assert capacity.admit_agent() and capacity.admit_agent()
    capacity.upstream_opened()
    assert not capacity.admit_agent()  # two agents and one upstream: the ceiling of 3
    assert capacity.refused_connections == 1
    capacity.upstream_closed()
    assert capacity.admit_agent()
    assert not capacity.may_hold(capacity.max_held) and capacity.not_held == 1


def test_a_held_ceiling_above_the_connection_ceiling_is_refused(tmp_path: Path):
    path = tmp_path / "cedargate.yaml"
    path.write_text("max_proxy_connections: 10\nmax_held_calls: 11\n")
    with pytest.raises(ConfigError, match=r"max_held_calls \(11\) exceeds max_proxy_connections \(10\)"):
        load_settings(path)
