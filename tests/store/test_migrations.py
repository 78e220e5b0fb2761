"""Packaged Alembic migrations: up from empty on both backends, idempotent, refusing a newer schema."""

from __future__ import annotations

import re

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from daemon.errors import SchemaTooNew, StoreError
from daemon.store import open_store
from daemon.store.migrate import head_revision, schema_state
from daemon.store.models import Base


def _stamp(url: str, revision: str) -> None:
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sqlalchemy.text("INSERT INTO alembic_version VALUES (:rev)"), {"rev": revision})
    engine.dispose()


def test_upgrade_from_empty_matches_models(empty_url: str) -> None:
    """Migrating an empty database reaches head and yields exactly the tables the models describe."""
    assert schema_state(empty_url) == (None, head_revision())
    store = open_store(empty_url)
    store.upgrade()
    with store.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    store.close()
    assert differences == []
    assert schema_state(empty_url) == (head_revision(), head_revision())


def test_upgrade_twice_is_a_no_op(empty_url: str) -> None:
    """A second upgrade leaves the schema and the data alone."""
    store = open_store(empty_url)
    store.upgrade()
    session = store.create_session("t", "manual", "p", {})
    store.upgrade()
    assert store.get_session(session.id) == session
    store.close()


def test_newer_schema_is_refused(empty_url: str) -> None:
    """A database stamped with a revision the code does not know raises SchemaTooNew and is not touched."""
    _stamp(empty_url, "9999_from_the_future")
    store = open_store(empty_url)
    with pytest.raises(SchemaTooNew, match=r"database schema 9999_from_the_future is newer than this program "
                                           r"knows \(head " + re.escape(head_revision()) + r"\): upgrade autoresearch"):
        store.upgrade()
    store.close()
    assert schema_state(empty_url) == ("9999_from_the_future", head_revision())
    inspector_engine = sqlalchemy.create_engine(empty_url)
    assert sqlalchemy.inspect(inspector_engine).get_table_names() == ["alembic_version"]
    inspector_engine.dispose()


def test_unmigrated_database_says_run_upgrade(empty_url: str) -> None:
    """Using a store whose database was never migrated raises StoreError pointing at `db upgrade`."""
    store = open_store(empty_url)
    with pytest.raises(StoreError) as caught:
        store.latest_session()
    store.close()
    assert caught.value.hint == "run `autoresearch db upgrade`"


def test_missing_sqlite_folder_is_reported(tmp_path: object) -> None:
    """A SQLite path in a folder that does not exist is a clear error, not a driver message."""
    with pytest.raises(StoreError, match="does not exist"):
        open_store("sqlite:////nonexistent-folder-for-test/autoresearch.db")


def test_malformed_url_is_reported() -> None:
    """A database.url that is not a URL says what a URL looks like."""
    with pytest.raises(StoreError) as caught:
        open_store("not a url")
    assert "postgresql+psycopg://" in caught.value.hint
