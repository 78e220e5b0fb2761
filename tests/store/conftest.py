"""Store fixtures: one suite over SQLite and real Postgres.

SQLite: each test copies a file migrated once per run. Postgres: the run's database is migrated
once and its tables are emptied before each test. Every test ends with no checked-out connection.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from daemon.store import Store, open_store
from daemon.store.records import SessionRecord

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
TABLES = ("scored_runs", "agent_calls", "noise", "experiments", "sessions")  # children first


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store-template") / "template.db"
    store = open_store(f"sqlite:///{path}")
    store.upgrade()
    store.close()
    return path


@pytest.fixture(scope="session")
def migrated_postgres_url(postgres_url: str) -> str:
    store = open_store(postgres_url)
    store.upgrade()
    store.close()
    return postgres_url


@pytest.fixture(scope="session")
def postgres_cleaner(migrated_postgres_url: str) -> Iterator[sqlalchemy.Engine]:
    engine = sqlalchemy.create_engine(migrated_postgres_url, pool_pre_ping=True)
    yield engine
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a migrated, empty database on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "store.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    cleaner = request.getfixturevalue("postgres_cleaner")
    with cleaner.begin() as conn:  # DELETE: far faster than TRUNCATE on tables this small
        for table in TABLES:
            conn.execute(sqlalchemy.text(f"DELETE FROM {table}"))
    yield request.getfixturevalue("migrated_postgres_url")


@pytest.fixture()
def store(store_url: str) -> Iterator[Store]:
    """A Store on a migrated, empty database; fails the test if a connection is left checked out."""
    opened = open_store(store_url, retry_seconds=5)
    yield opened
    checked_out = opened.engine.pool.checkedout()
    opened.close()
    assert checked_out == 0, f"{checked_out} connection(s) left checked out"


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a database with no tables at all, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server_url = request.getfixturevalue("postgres_url").rsplit("/", 1)[0]
    name = f"autoresearch_empty_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{server_url}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture()
def session(store: Store) -> SessionRecord:
    return store.create_session("night-1", "manual", "# program\n", {"training": {"time_budget_s": 1}})

