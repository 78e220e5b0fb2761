"""Engine set-up: SQLite pragmas, URL spellings, health ping, concurrent upgrades."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy

from daemon.store import open_store
from daemon.store.migrate import head_revision, schema_state


def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path: Path) -> None:
    """SQLite connections use WAL, enforce foreign keys and wait for locks instead of failing at once."""
    store = open_store(f"sqlite:///{tmp_path / 'a.db'}")
    with store.engine.connect() as conn:
        pragmas = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                   for name in ("journal_mode", "foreign_keys", "busy_timeout")}
    store.close()
    assert pragmas["journal_mode"] == "wal"
    assert pragmas["foreign_keys"] == 1
    assert int(pragmas["busy_timeout"]) >= 1000


@pytest.mark.postgres
def test_plain_postgresql_url_uses_psycopg(postgres_url: str) -> None:
    """A postgresql:// URL without a driver works (psycopg 3, not the absent psycopg2)."""
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    store = open_store(plain)
    assert store.engine.dialect.driver == "psycopg"
    assert store.ping()
    store.close()
    assert schema_state(plain)[1] == head_revision()


def test_ping_is_false_when_unreachable() -> None:
    """ping() answers False, without retrying, when the server does not answer."""
    store = open_store("postgresql+psycopg://postgres@127.0.0.1:1/none", retry_seconds=60)
    assert store.ping() is False
    store.close()


def test_concurrent_upgrades_both_succeed(empty_url: str) -> None:
    """Two daemons upgrading the same empty database at once both succeed and migrate it once."""
    errors: list[BaseException] = []

    def upgrade() -> None:
        store = open_store(empty_url, retry_seconds=30)
        try:
            store.upgrade()
        except BaseException as exc:  # collected for the assertion in the main thread
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=upgrade) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert schema_state(empty_url) == (head_revision(), head_revision())
    engine = sqlalchemy.create_engine(empty_url)
    with engine.connect() as conn:
        versions = conn.execute(sqlalchemy.text("SELECT count(*) FROM alembic_version")).scalar_one()
    engine.dispose()
    assert versions == 1
