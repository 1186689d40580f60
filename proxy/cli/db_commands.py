"""`cedargate db`: see and apply the decision store's schema migrations.

`cedargate run` applies them itself at start; these commands let an operator see where a store stands
(`current`) and upgrade it ahead of a start (`upgrade`), e.g. before rolling out a release. The store
is found the way `cedargate audit verify` finds it. Exit 0 on success, 1 if `current` finds the store
behind, 2 if the store cannot be read or upgraded.
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy.exc import SQLAlchemyError

from proxy.cli.audit_commands import StoreNotFound, add_store_arguments, open_store
from proxy.record.migrations import MigrationError, current_revision, head_revision, migrate
from proxy.vocabulary.printable import printable


def add_db_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = subparsers.add_parser("db", help="see and apply the decision store's schema migrations")
    commands = db.add_subparsers(dest="db_command", required=True)
    add_store_arguments(commands.add_parser(
        "current", help="print the store's schema revision; exit 1 if it is behind this release"))
    add_store_arguments(commands.add_parser(
        "upgrade", help="bring the store to this release's schema (as `cedargate run` does at start)"))


def run_db_command(args: argparse.Namespace) -> int:
    try:
        engine, shown = open_store(args)
    except StoreNotFound as exc:
        return _fail(str(exc))
    head = head_revision()
    try:
        if args.db_command == "upgrade":
            print(f"{shown}: at revision {migrate(engine)} (newest)")
            return 0
        revision = current_revision(engine)
    except MigrationError as exc:
        return _fail(f"{shown}: {exc}")
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return _fail(f"cannot migrate {shown}: {type(cause).__name__}: {cause}")
    finally:
        engine.dispose()
    if revision == head:
        print(f"{shown}: at revision {revision} (newest)")
        return 0
    if revision is None:
        print(f"{shown}: no revision (a new store, or one made by cedargate 0.1.0); newest is {head}: "
              "`cedargate db upgrade` or `cedargate run` brings it there")
    else:
        print(f"{shown}: at revision {revision}, newest is {head}: "
              "`cedargate db upgrade` or `cedargate run` brings it there")
    return 1


def _fail(message: str) -> int:
    print(printable(f"cedargate: {message}"), file=sys.stderr)
    return 2
