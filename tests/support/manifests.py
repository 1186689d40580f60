"""Policy directories given a test's own action manifest, for the tests that proxy their own upstreams.

`use_manifest` turns a copy of the bundled policies into one whose manifest (actions.yaml) is the test's,
with the test's policies in one file, the bundled file whose actions came from the manifest replaced
removed, and the schema the manifest generates written by `cedargate schema`, as an operator writes it.
`loopback_mcp_policies` is the one several tests share: a single MCP endpoint, `http://127.0.0.1/mcp` as
server `github` with one tool, `search_issues` (severity low), which team ops may open sessions with
and call.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.launch import CEDARGATE, REPO

MANIFEST = {"hosts": [{"host": "127.0.0.1", "mcp": [{
    "path": "/mcp", "server": "github", "tools": {"search_issues": {"severity": "low"}},
}]}]}
POLICIES = """
@id("github-mcp-sessions")
permit (principal in Team::"ops", action == Action::"mcp_rpc", resource == McpServer::"github");

@id("github-tools")
permit (principal in Team::"ops", action == Action::"call_tool", resource in McpServer::"github");
"""


def use_manifest(policy_dir: Path, manifest: dict[str, Any], policies: str, *, into: str = "github.cedar",
                 replaces: str = "payments.cedar") -> Path:
    """`policy_dir`, a copy of the bundled policies, with `manifest` and `policies` (in the file `into`)
    instead of the bundled manifest and `replaces`, whose actions came from that manifest; and its schema."""
    (policy_dir / "actions.yaml").write_text(yaml.safe_dump(manifest))
    (policy_dir / into).write_text(policies)
    (policy_dir / replaces).unlink()
    written = subprocess.run([str(CEDARGATE), "schema", str(policy_dir)], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
    assert written.returncode == 0, written.stderr
    return policy_dir


def loopback_mcp_policies(policy_dir: Path) -> Path:
    """`policy_dir`, a copy of the bundled policies, proxying the MCP server the module describes."""
    return use_manifest(policy_dir, MANIFEST, POLICIES)
