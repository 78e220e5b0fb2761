"""Upgrade and rollback: a database at revision 0005 full of data goes to head and back, losing nothing.

Written against the schema as reflected, not the models: whatever migrations come after 0005, every row and
every value of the 0005 tables must survive the upgrade and the downgrade back to 0005 unchanged; the CLI
backs the database up first and refuses to migrate while a daemon holds the lock.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic import command

from daemon.store import open_store
from daemon.store.backup import backup_database
from daemon.store.migrate import alembic_config, head_revision, schema_state

START = "0005_scored_runs"


def _migrate_to(url: str, revision: str) -> None:
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)
    engine.dispose()


def _value(column: sqlalchemy.Column[Any], row: int) -> Any:
    """A distinct, type-correct value for `column` in row number `row`."""
    kind = column.type
    if isinstance(kind, sqlalchemy.Boolean):
        return row % 2 == 0
    if isinstance(kind, sqlalchemy.Integer):
        return 1000 + row
    if isinstance(kind, sqlalchemy.Float | sqlalchemy.Numeric):
        return 1.25 + row
    if isinstance(kind, sqlalchemy.DateTime):
        return dt.datetime(2026, 12, 1, 3, row % 60, tzinfo=dt.timezone.utc if kind.timezone else None)
    if isinstance(kind, sqlalchemy.JSON):
        return {"row": row, "text": "naïve ✓"}
    length = getattr(kind, "length", None) or 200
    return f"{column.name}-{row}-ü"[:length]


def _fill(url: str, rows_per_table: int = 3) -> dict[str, list[dict[str, Any]]]:
    """Insert rows into every table (parents first, foreign keys pointing at real rows); return them as read."""
    engine = sqlalchemy.create_engine(url)
    metadata = sqlalchemy.MetaData()
    metadata.reflect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            if table.name == "alembic_version":
                continue
            for row in range(1, rows_per_table + 1):
                values: dict[str, Any] = {}
                for column in table.columns:
                    foreign = next(iter(column.foreign_keys), None)
                    if foreign is not None:
                        values[column.name] = row  # the parent's row with the same number (ids start at 1)
                    elif column.primary_key and isinstance(column.type, sqlalchemy.Integer):
                        values[column.name] = row
                    else:
                        values[column.name] = _value(column, row)
                conn.execute(table.insert().values(**values))
    snapshot = _read(engine, metadata)
    engine.dispose()
    return snapshot


def _read(engine: sqlalchemy.Engine, metadata: sqlalchemy.MetaData) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            if table.name == "alembic_version":
                continue
            order = list(table.primary_key.columns) or list(table.columns)
            out[table.name] = [dict(row._mapping) for row in conn.execute(table.select().order_by(*order))]
    return out


def _now(url: str, tables: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of `tables` now, restricted to the columns they had."""
    engine = sqlalchemy.create_engine(url)
    metadata = sqlalchemy.MetaData()
    metadata.reflect(engine, only=list(tables))
    current = _read(engine, metadata)
    engine.dispose()
    return {name: [{key: row[key] for key in (tables[name][0] if tables[name] else {})} for row in rows]
            for name, rows in current.items()}


def test_upgrade_from_0005_and_back_loses_nothing(empty_url: str) -> None:
    """Every row and value of a 0005 database survives upgrade to head and downgrade back to 0005."""
    _migrate_to(empty_url, START)
    before = _fill(empty_url)
    assert all(before.values()), "every table got rows"
    store = open_store(empty_url)
    store.upgrade()
    assert schema_state(empty_url) == (head_revision(), head_revision())
    assert _now(empty_url, before) == before
    store.downgrade("0005")
    store.close()
    assert schema_state(empty_url)[0] == START
    assert _now(empty_url, before) == before


def test_downgrade_refuses_a_revision_above_the_database(empty_url: str) -> None:
    """Downgrading "to" a revision above the database's is refused, and nothing changes."""
    from daemon.errors import StoreError

    _migrate_to(empty_url, "0004_sandbox_jobs")
    store = open_store(empty_url)
    with pytest.raises(StoreError, match="is not at or below"):
        store.downgrade("0005")
    store.close()
    assert schema_state(empty_url)[0] == "0004_sandbox_jobs"


def test_sqlite_backup_is_a_usable_copy(tmp_path: Path) -> None:
    """The backup of a SQLite database opens on its own with the same rows."""
    url = f"sqlite:///{tmp_path / 'live.db'}"
    _migrate_to(url, START)
    before = _fill(url)
    copy = backup_database(url, tmp_path / "backups", START)
    assert copy.name.startswith(f"live-{START}-") and copy.suffix == ".sqlite"
    assert _now(f"sqlite:///{copy}", before) == before


@pytest.mark.postgres
def test_postgres_backup_restores_with_pg_restore(postgres_url: str, tmp_path: Path) -> None:
    """The pg_dump backup restores into an empty database with the same rows."""
    import uuid

    server = postgres_url.rsplit("/", 1)[0]
    names = [f"autoresearch_bk_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    admin = sqlalchemy.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        source, target = (f"{server}/{name}" for name in names)
        _migrate_to(source, START)
        before = _fill(source)
        dump = backup_database(source, tmp_path, START)
        from daemon.store.backup import pg_binary

        restore = pg_binary("pg_restore")
        plain = sqlalchemy.engine.make_url(target).set(drivername="postgresql").render_as_string(hide_password=False)
        subprocess.run([restore, "--dbname", plain, str(dump)], check=True, capture_output=True)
        assert _now(target, before) == before
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
