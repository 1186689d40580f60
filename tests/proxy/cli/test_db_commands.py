"""`cedargate db current` and `cedargate db upgrade`, on a real SQLite file and PostgreSQL schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from proxy.cli.main import main
from proxy.record.migrations import head_revision


@pytest.fixture
def new_store(tmp_path: Path) -> Path:
    """An empty SQLite file in a state dir, as an operator might point the commands at."""
    path = tmp_path / "state" / "cedargate.db"
    path.parent.mkdir()
    sqlite3.connect(path).close()
    return path


def test_current_says_a_store_is_behind_until_upgrade_brings_it_to_the_newest(new_store: Path, capsys):
    state = ["--state-dir", str(new_store.parent)]
    head = head_revision()

    assert main(["db", "current", *state]) == 1
    assert capsys.readouterr().out == (
        f"sqlite:///{new_store}: no revision (a new store, or one made by cedargate 0.1.0); "
        f"newest is {head}: `cedargate db upgrade` or `cedargate run` brings it there\n")

    assert main(["db", "upgrade", *state]) == 0
    assert capsys.readouterr().out == f"sqlite:///{new_store}: at revision {head} (newest)\n"
    with sqlite3.connect(new_store) as con:
        assert {"decisions", "audit_log", "overrides"} <= {
            name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    assert main(["db", "current", *state]) == 0
    assert capsys.readouterr().out == f"sqlite:///{new_store}: at revision {head} (newest)\n"


def test_upgrade_refuses_tables_cedargate_did_not_make(new_store: Path, capsys):
    with sqlite3.connect(new_store) as con:
        con.execute("CREATE TABLE decisions (id INTEGER PRIMARY KEY, note TEXT)")

    assert main(["db", "upgrade", "--database-url", f"sqlite:///{new_store}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cedargate: sqlite:///{new_store}: the database's tables differ from those")
    assert "point cedargate at a new database, or mend these tables" in err
    with sqlite3.connect(new_store) as con:
        tables = [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    assert tables == ["decisions"]  # left as it was


def test_a_missing_store_is_refused_not_created(tmp_path: Path, capsys):
    for command in ("current", "upgrade"):
        assert main(["db", command, "--state-dir", str(tmp_path / "nowhere")]) == 2
        assert capsys.readouterr().err == (
            f"cedargate: no decision store at {tmp_path / 'nowhere' / 'cedargate.db'}: "
            "give --database-url, --state-dir or --config\n")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.postgres
def test_upgrade_and_current_on_postgres(pg_url: str, capsys):
    head = head_revision()
    assert main(["db", "current", "--database-url", pg_url]) == 1
    assert "no revision" in capsys.readouterr().out
    assert main(["db", "upgrade", "--database-url", pg_url]) == 0
    assert main(["db", "current", "--database-url", pg_url]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(f": at revision {head} (newest)")
