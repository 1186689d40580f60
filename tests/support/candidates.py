"""What the replay and shadow tests share: a real cedargate started on a config of their own, and a
candidate policy set that differs from the bundled one in two known ways.

The candidate forbids listing instances (`no-instance-listing`: a listing the live set allows is denied)
and drops `protect-production-instances` (a production stop the live set escalates is allowed, under
`ops-stop-instance`). Every other call is decided as the live set decides it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import yaml

from tests.support.launch import AGENT, TOKEN, Cedargate, start_cedargate

NO_LISTING = """
// Candidate: nobody lists instances any more.
@id("no-instance-listing")
forbid (principal, action == Action::"get", resource) when { context.path like "/v1/instances*" };
"""


def candidate_policies(policy_dir: Path, target: Path) -> Path:
    """A copy of `policy_dir` changed as the module says."""
    shutil.copytree(policy_dir, target)
    ops = (target / "ops.cedar").read_text()
    start = ops.index('@id("protect-production-instances")')
    end = ops.index("};", start) + 2
    (target / "ops.cedar").write_text(ops[:start] + ops[end:] + NO_LISTING)
    return target


def start_with(tmp_path: Path, policy_dir: Path, **extra: object) -> Cedargate:
    """A real `cedargate run` on `policy_dir`, agent ops-bot, ports picked freely, and `extra` settings."""
    config = {
        "proxy": {"host": "127.0.0.1", "port": 0}, "api": {"host": "127.0.0.1", "port": 0},
        "policy_dir": str(policy_dir), "state_dir": str(tmp_path / "state"), "policy_reload_interval": 0.2,
        "agents": {AGENT: {"token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}},
        **extra,
    }
    path = tmp_path / "cedargate.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_cedargate(path)
