"""A policy directory that proxies one MCP server on loopback, for the tests that run their own MCP server.

The bundled policies' manifest (actions.yaml) is replaced by one listing a single MCP endpoint,
`http://127.0.0.1/mcp` as server `github` with one tool, `search_issues` (severity low), and github.cedar
by two permits: team ops may open sessions with it and call its tools. payments.cedar goes, as its
actions came from the manifest replaced; the schema the manifest generates is written beside it, as
`cedargate schema` writes it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from proxy.cedar.manifest import MANIFEST_SCHEMA_FILE, load_manifest, schema_text

MANIFEST = {"hosts": [{"host": "127.0.0.1", "mcp": [{
    "path": "/mcp", "server": "github", "tools": {"search_issues": {"severity": "low"}},
}]}]}
POLICIES = """
@id("github-mcp-sessions")
permit (principal in Team::"ops", action == Action::"mcp_rpc", resource == McpServer::"github");

@id("github-tools")
permit (principal in Team::"ops", action == Action::"call_tool", resource in McpServer::"github");
"""


def loopback_mcp_policies(policy_dir: Path) -> Path:
    """`policy_dir`, a copy of the bundled policies, changed as the module says."""
    (policy_dir / "actions.yaml").write_text(yaml.safe_dump(MANIFEST))
    (policy_dir / "github.cedar").write_text(POLICIES)
    (policy_dir / "payments.cedar").unlink()  # its actions come from the bundled manifest this one replaces
    manifest = load_manifest(str(policy_dir))
    assert manifest is not None
    (policy_dir / MANIFEST_SCHEMA_FILE).write_text(schema_text(manifest), encoding="utf-8")
    return policy_dir
