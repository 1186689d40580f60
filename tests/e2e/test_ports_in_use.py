"""A port already in use, for the proxy or the API: `cedargate run` says so in one line on stderr and exits
2, with no traceback, whether it runs as one process or with workers."""

from __future__ import annotations

import socket
import subprocess

import pytest
from e2e_support import CEDARGATE, REPO, write_config


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("front, flag, said", [
    ("proxy", "--listen-port", "the proxy cannot listen on 127.0.0.1:{port}: Address already in use; "),
    ("API", "--api-port", "the override API cannot listen on 127.0.0.1:{port}: Address already in use; "),
])
def test_a_taken_port_is_one_clear_line_and_exit_2(tmp_path, policy_dir, upstream, workers, front, flag, said):
    config = write_config(tmp_path / "cedargate.yaml", policy_dir, tmp_path / "state", upstream)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([str(CEDARGATE), "run", "--config", str(config), flag, str(port),
                              "--workers", str(workers)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "listening" not in run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("cedargate")]
    assert len(errors) == 1, run.stderr
    assert errors[0].startswith("cedargate: " + said.format(port=port)), errors
    assert run.stderr.endswith(errors[0] + "\n")
