"""`cedargate audit`: check a decision store's tamper-evident audit log from the command line.

`cedargate audit verify` finds the store the way `cedargate run` does (`--database-url`, else the
SQLite file in the state dir, from `--state-dir` or `--config`), walks the hash chain and exits 0 if
it is intact, 1 naming the first bad row if not, 2 if there is no log it can read, and 3 if the chain
is intact but forwarded calls are still only in a dead process's decision journal (see `open_record`).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from proxy.record.audit import AuditLogError, verify
from proxy.record.store import journal_waiting, replay_journal
from proxy.settings.config import ConfigError, load_settings
from proxy.vocabulary.printable import printable


def add_audit_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser("audit", help="check the tamper-evident audit log")
    commands = audit.add_subparsers(dest="audit_command", required=True)
    check = commands.add_parser(
        "verify", help="walk the hash chain; exit 0 if intact, 1 naming the first bad row, 2 if unreadable, "
        "3 if intact but forwarded calls are still only in a stopped process's decision journal"
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


def open_record(args: argparse.Namespace) -> tuple[Engine, str, str | None]:
    """`open_store` for a command that reads the record, and what the record lacks (None: nothing known).

    On SQLite a call's row may be only in the decision journal of a process killed before committing it
    (`proxy.record.journal`); a start of cedargate replays it, and so does this, first: the calls it
    forwarded are on the record before anyone reads it. That needs write access to the database and its
    journal; without it, what is left out is said on stderr and returned."""
    engine, shown = open_store(args)
    try:
        done = replay_journal(engine)
        waiting = journal_waiting(engine, done.kept_ids) if done.kept_ids else 0
    except (SQLAlchemyError, sqlite3.Error, OSError) as exc:  # the command's own read says what is wrong
        print(printable(f"cedargate: {shown}: the decision journal was not looked at: {exc}"), file=sys.stderr)
        return engine, shown, None
    if done.replayed:
        print(printable(f"cedargate: {shown}: {done.replayed} forwarded calls committed from the decision journal "
                        "of a process that stopped before it could"), file=sys.stderr)
    if done.rejected:
        print(printable(f"cedargate: {shown}: WARNING: {done.rejected} journaled rows the store refuses are NOT in "
                        "the record: set aside in the journal directory's *.rejected files"), file=sys.stderr)
    lacking = []
    if waiting:
        lacking.append(f"{waiting} forwarded calls are in the decision journal of a stopped process and NOT yet in "
                       "the record")
    if done.unread:
        lacking.append(f"{done.unread} journal segments of stopped processes could not be read")
    if not lacking:
        return engine, shown, None
    said = "; ".join(lacking)
    print(printable(f"cedargate: {shown}: WARNING: {said}; this command could not replay them: start cedargate "
                    "on this store, or run this as a user who can write it and its journal"), file=sys.stderr)
    return engine, shown, said


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file, to find the store as `cedargate run` would")
    parser.add_argument("--state-dir", help="state dir whose cedargate.db to use (default .cedargate)")
    parser.add_argument("--database-url", help="SQLAlchemy URL of the decision store (wins over the others)")


def _verify(args: argparse.Namespace) -> int:
    try:
        engine, shown, lacking = open_record(args)
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
    if lacking:
        # Not 0: a script that certifies the record on this exit code must not be told it is complete.
        print(printable(f"audit log INCOMPLETE: {lacking}"))
        return 3
    return 0


def _fail(message: str) -> int:
    print(printable(f"cedargate: {message}"), file=sys.stderr)
    return 2
