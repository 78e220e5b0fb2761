"""Transient database errors: which are retried, giving up cleanly, and a real Postgres restart mid-loop."""

from __future__ import annotations

import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.exc import OperationalError

from daemon.errors import StoreError
from daemon.store import Store, open_store
from daemon.store.retry import is_transient
from tests.pgcluster import PgCluster

WRITES_AROUND_RESTART = 20


def _wrapped(orig: Exception) -> OperationalError:
    return OperationalError("UPDATE experiments SET ...", {}, orig)


def test_sqlite_lock_is_transient() -> None:
    """'database is locked' from SQLite is worth another attempt."""
    assert is_transient(_wrapped(sqlite3.OperationalError("database is locked")))


def test_missing_table_is_not_transient() -> None:
    """A missing table will not appear by waiting: no retry."""
    assert not is_transient(_wrapped(sqlite3.OperationalError("no such table: experiments")))


def test_unreachable_server_gives_up_with_store_error() -> None:
    """A server that never answers is retried for retry_seconds, then reported as StoreError with a hint."""
    store = open_store("postgresql+psycopg://postgres@127.0.0.1:1/none", retry_seconds=0.3)
    with pytest.raises(StoreError, match="database unavailable") as caught:
        store.latest_session()
    store.close()
    assert "database.url" in caught.value.hint


def test_sqlite_write_waits_for_another_writer(tmp_path: Path) -> None:
    """A write while another connection holds SQLite's write lock waits for it, then succeeds."""
    path = tmp_path / "locked.db"
    store = open_store(f"sqlite:///{path}", retry_seconds=30)
    store.upgrade()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.5, holder.rollback)
    release.start()
    created = store.create_session("t", "manual", "p", {})
    store.close()
    release.join()
    holder.close()
    assert created.id == 1


def _restart_postgres(cluster: PgCluster, outcome: list[subprocess.CompletedProcess[str]]) -> None:
    outcome.append(cluster.restart())  # the suite's own cluster, never the host's


@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_restart_mid_write_loop(migrated_postgres_url: str, postgres_cluster: PgCluster) -> None:
    """Postgres restarted during a write loop: the loop resumes, no row lost, none written twice."""
    store: Store = open_store(migrated_postgres_url, retry_seconds=60)
    session = store.create_session("restart", "manual", "p", {})
    outcome: list[subprocess.CompletedProcess[str]] = []
    restarter = threading.Thread(target=_restart_postgres, args=(postgres_cluster, outcome))
    written = 0

    def write_one() -> None:
        nonlocal written
        record = store.create_experiment(session.id, "candidate", f"x = {written}\n", description=f"write {written}")
        moved = store.claim_next(session.id, "host-a:1", "lane0", None, 60)
        assert moved is not None and moved.id == record.id
        store.transition(record.id, "running", "crashed", error=f"done {written}")
        written += 1

    for _ in range(WRITES_AROUND_RESTART):
        write_one()
    restarter.start()
    while restarter.is_alive():
        write_one()
    restarter.join()
    assert outcome[0].returncode == 0, outcome[0].stderr
    for _ in range(WRITES_AROUND_RESTART):
        write_one()
    engine = sqlalchemy.create_engine(migrated_postgres_url)
    with engine.connect() as conn:
        rows = conn.execute(sqlalchemy.text(
            "SELECT description, status, error FROM experiments WHERE session_id = :s ORDER BY id"),
            {"s": session.id}).all()
    engine.dispose()
    assert [r.description for r in rows] == [f"write {i}" for i in range(written)]
    assert {r.status for r in rows} == {"crashed"}
    assert [r.error for r in rows] == [f"done {i}" for i in range(written)]
    assert store.engine.pool.checkedout() == 0
    store.close()
