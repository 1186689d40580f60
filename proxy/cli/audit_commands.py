"""`cedargate audit`: check a decision store's tamper-evident audit log from the command line.

`cedargate audit verify` finds the store the way `cedargate run` does (`--database-url`, else the
SQLite file in the state dir, from `--state-dir` or `--config`), walks the hash chain and exits 0 if
it is intact, 1 naming the first bad row if not, and 2 if there is no log it can read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from proxy.record.audit import AuditLogError, verify
from proxy.settings.config import ConfigError, load_settings
from proxy.vocabulary.printable import printable


def add_audit_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser("audit", help="check the tamper-evident audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True)
    check = commands.add_parser(
        "verify", help="walk the hash chain; exit 0 if intact, 1 naming the first bad row, 2 if unreadable"
    )
    add_store_arguments(check)


def run_audit_command(args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        return _verify(args)
    raise ValueError(f"unknown audit command {args.audit_command!r}")


class StoreNotFound(Exception):
    """The store named by the flags cannot be opened; the message says why and how to name it."""


def open_store(args: argparse.Namespace) -> tuple[Engine, str]:
    """The engine of the store `cedargate run` would use with these flags, and its URL to show.

    Raises `StoreNotFound`; a SQLite file that does not exist is refused, never created.
    """
    try:
        flags = {"state_dir": args.state_dir, "database_url": args.database_url}
        settings = load_settings(args.config, flags)
    except ConfigError as exc:
        raise StoreNotFound(str(exc)) from exc
    try:
        url = make_url(settings.effective_database_url)
    except ArgumentError as exc:
        raise StoreNotFound(
            f"{settings.effective_database_url!r} is not a database URL, e.g. sqlite:///path/to/cedargate.db"
        ) from exc
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        # Opening a missing file would create an empty store.
        if not Path(url.database).is_file():
            raise StoreNotFound(
                f"no decision store at {url.database}: give --database-url, --state-dir or --config")
    try:
        return create_engine(url, hide_parameters=True), shown
    except ArgumentError as exc:  # e.g. a driver that is not installed
        raise StoreNotFound(f"cannot open {shown}: {exc}") from exc


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file, to find the store as `cedargate run` would")
    parser.add_argument("--state-dir", help="state dir whose cedargate.db to use (default .cedargate)")
    parser.add_argument("--database-url", help="SQLAlchemy URL of the decision store (wins over the others)")


def _verify(args: argparse.Namespace) -> int:
    try:
        engine, shown = open_store(args)
    except StoreNotFound as exc:
        return _fail(str(exc))
    try:
        result = verify(engine)
    except AuditLogError as exc:
        return _fail(f"{shown}: {exc}")
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return _fail(f"cannot read the audit log in {shown}: {type(cause).__name__}: {cause}")
    finally:
        engine.dispose()
    if not result.ok:
        # The reason may quote a stored value, which an agent chose: escaped like every view.
        print(printable(f"audit log TAMPERED at row seq {result.first_bad_seq}: {result.reason}"))
        return 1
    print(f"audit log OK: {result.rows_checked} rows")
    if result.rows_checked:
        seq, digest = result.head
        print(printable(f"head: seq {seq} hash {digest}"))
    return 0


def _fail(message: str) -> int:
    print(printable(f"cedargate: {message}"), file=sys.stderr)
    return 2
