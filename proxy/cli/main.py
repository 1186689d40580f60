"""The `cedargate` command: run the proxy, review overrides, hash tokens, check a policy directory, replay
recorded calls against candidate policies."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from proxy.cedar.manifest import (
    MANIFEST_FILE,
    MANIFEST_SCHEMA_FILE,
    ManifestError,
    load_manifest,
    schema_text,
)
from proxy.cedar.policy import PolicyLoadError, load_bundle
from proxy.cli.audit_commands import add_audit_commands, run_audit_command
from proxy.cli.db_commands import add_db_commands, run_db_command
from proxy.cli.explain import add_explain_command, run_explain_command
from proxy.cli.override_commands import add_overrides_commands, run_overrides_command
from proxy.cli.replay import add_replay_command, run_replay_command
from proxy.cli.report_command import add_report_command, run_report_command
from proxy.oversight import urgency
from proxy.oversight.reachability import approver_roles, unreachable_escalations, with_tokens
from proxy.record.store import StoreUnavailable
from proxy.settings.agents import hash_token, new_token
from proxy.settings.config import ConfigError, load_settings

DEFAULT_CONFIG = "cedargate.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cedargate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cedargate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the proxy and the override API")
    run.add_argument("--config", help="YAML config file (flags win over it)")
    run.add_argument("--policy-dir", help="directory of *.cedar, *.cedarschema and entities.json")
    run.add_argument("--listen-host", help="proxy address (default 127.0.0.1)")
    run.add_argument("--listen-port", type=int, help="proxy port (default 8080; 0 = any free port)")
    run.add_argument("--api-host", help="override API address (default 127.0.0.1)")
    run.add_argument("--api-port", type=int, help="override API port (default 8081; 0 = any free port)")
    run.add_argument("--allow-non-loopback", action="store_true", default=None,
                     help="permit binding to an address other hosts can reach")
    run.add_argument("--state-dir", help="where the CA and the SQLite store live (default .cedargate)")
    run.add_argument("--database-url", help="SQLAlchemy URL of the decision store (default SQLite in state dir)")
    run.add_argument("--workers", type=int, help="proxy processes on the proxy's port (default 1: one process "
                     "runs the proxy and the API; with more, one more runs the API)")
    run.add_argument("--log-level", default="INFO")

    check = sub.add_parser("check", help="load and validate a policy directory, as `run` would at start, and "
                           "name the escalations no configured approver could grant")
    check.add_argument("policy_dir")
    check.add_argument("--config", help="the YAML config whose approvers are checked (default cedargate.yaml "
                       "when there is one here)")

    schema = sub.add_parser("schema", help="write the Cedar schema of a policy directory's actions.yaml")
    schema.add_argument("policy_dir", nargs="?", default="policies")
    schema.add_argument("--stdout", action="store_true", help="print it instead of writing actions.cedarschema")

    hasher = sub.add_parser("hash-token", help="print the token_sha256 of a token read from stdin")
    hasher.add_argument("--new", action="store_true", help="make a new random token and print both")

    add_overrides_commands(sub)
    add_audit_commands(sub)
    add_db_commands(sub)
    add_explain_command(sub)
    add_replay_command(sub)
    add_report_command(sub)

    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "overrides":
        return run_overrides_command(args)
    if args.command == "audit":
        return run_audit_command(args)
    if args.command == "db":
        return run_db_command(args)
    if args.command == "explain":
        return run_explain_command(args)
    if args.command == "replay":
        return run_replay_command(args)
    if args.command == "report":
        return run_report_command(args)
    if args.command == "check":
        return _check(args.policy_dir, args.config)
    if args.command == "schema":
        return _schema(args.policy_dir, args.stdout)
    return _hash(args.new)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cedargate")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # mitmproxy logs every connection at INFO; cedargate's own lines say what matters per call.
    logging.getLogger("mitmproxy").setLevel(max(logging.WARNING, logging.getLogger().level))
    overrides = {
        "policy_dir": args.policy_dir,
        "proxy.host": args.listen_host,
        "proxy.port": args.listen_port,
        "api.host": args.api_host,
        "api.port": args.api_port,
        "allow_non_loopback": args.allow_non_loopback,
        "state_dir": args.state_dir,
        "database_url": args.database_url,
        "workers": args.workers,
    }
    try:
        settings = load_settings(args.config, overrides)
        from proxy.cli.serve import serve

        urgency.run(serve(settings, log_level=args.log_level))
    except (ConfigError, PolicyLoadError, StoreUnavailable) as exc:
        print(f"cedargate: {exc}", file=sys.stderr)
        return 2
    return 0


def _check(policy_dir: str, config: str | None) -> int:
    try:
        bundle = load_bundle(policy_dir)
    except PolicyLoadError as exc:
        print(f"cedargate: {exc}", file=sys.stderr)
        return 1
    print(f"{policy_dir}: {len(bundle.policies)} policies valid, revision {bundle.revision}")
    if config is None and Path(DEFAULT_CONFIG).is_file():
        config = DEFAULT_CONFIG
    if config is None:
        print(f"approvers not checked: no {DEFAULT_CONFIG} here (give --config)")
        return 0
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        print(f"cedargate: {exc}", file=sys.stderr)
        return 1
    # As `run` would see them: tokens from the file, or from variables set in this environment.
    signed, idle = approver_roles(settings.approvers, with_tokens(settings.approvers, os.environ))
    unreachable = unreachable_escalations(bundle.policies.values(), signed, idle)
    for escalation in unreachable:
        print(f"cedargate: warning: {escalation.message}", file=sys.stderr)
    every = "every escalation can" if not unreachable else f"{len(unreachable)} escalations cannot"
    print(f"approvers from {config}: {len(signed)} of {len(settings.approvers)} can sign in here; {every} "
          "be granted")
    return 0


def _schema(policy_dir: str, to_stdout: bool) -> int:
    try:
        manifest = load_manifest(policy_dir)
    except ManifestError as exc:
        print(f"cedargate: {exc}", file=sys.stderr)
        return 1
    if manifest is None:
        print(f"cedargate: {Path(policy_dir) / MANIFEST_FILE} does not exist", file=sys.stderr)
        return 1
    text = schema_text(manifest)
    if to_stdout:
        print(text, end="")
        return 0
    target = Path(policy_dir) / MANIFEST_SCHEMA_FILE
    target.write_text(text, encoding="utf-8")
    endpoints = manifest.mcp_endpoints
    mcp = f", {len(endpoints)} MCP endpoints ({sum(len(e.tools) for e in endpoints)} tools)" if endpoints else ""
    print(f"wrote {target}: {len(manifest.actions)} actions{mcp}")
    return 0


def _hash(make_new: bool) -> int:
    token = new_token() if make_new else sys.stdin.readline().strip()
    if not token:
        print("cedargate: no token on stdin", file=sys.stderr)
        return 2
    if make_new:
        print(f"token:        {token}")
    print(f"token_sha256: {hash_token(token)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
