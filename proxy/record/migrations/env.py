"""Alembic's entry to cedargate's schema: run by `proxy.record.migrations.migrate` and by developers.

`migrate` hands over a connection it holds under the migration lock (`config.attributes["connection"]`).
A developer runs `alembic` with the repository's alembic.ini, which names no database: give one with
`alembic -x url=sqlite:///.cedargate/cedargate.db ...`. Only then are the
models loaded, every package's tables into one metadata, for `alembic revision --autogenerate`; that is
why this script, which the core never imports, may reach the oversight and notify packages above the record.
Either way the revision is kept in cedargate's own table (`VERSION_TABLE`), not Alembic's default
alembic_version, which another application's migrations may own in a shared schema.
"""

from __future__ import annotations

import importlib

from alembic import context
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection

from proxy.record.migrations import VERSION_TABLE

MODEL_MODULES = ("proxy.record.store", "proxy.record.audit", "proxy.record.shadow", "proxy.oversight.overrides",
                 "proxy.oversight.reviewer_sessions", "proxy.notify.outbox")

config = context.config


def models_metadata() -> MetaData:
    for name in MODEL_MODULES:
        importlib.import_module(name)
    from sqlmodel import SQLModel

    return SQLModel.metadata


def run(connection: Connection, target_metadata: MetaData | None) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        version_table=VERSION_TABLE,
        # SQLite alters a table by copying it: autogenerate writes batch operations that do so.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


given = config.attributes.get("connection")
if given is not None:
    run(given, config.attributes.get("target_metadata"))
else:
    from proxy.record.store import make_engine

    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("name the database: alembic -x url=sqlite:///path/to/cedargate.db ...")
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            run(connection, models_metadata())
    finally:
        engine.dispose()
