"""Postgres restarted while a real session trains: the session goes on and no experiment row is lost or doubled."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy

from daemon.research.workspace import Workspace
from tests.e2e.support import empty_database, run_session, tiny_settings
from tests.pgcluster import PgCluster

pytestmark = [pytest.mark.postgres, pytest.mark.slow]



def _running_experiments(url: str) -> int:
    """Rows in `running` now, through a fresh connection (a pooled one would not survive the restart)."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sqlalchemy.text(
                "SELECT count(*) FROM experiments WHERE status = 'running'")).scalar_one())
    except sqlalchemy.exc.DBAPIError:  # no schema yet, or the server is restarting
        return 0
    finally:
        engine.dispose()


def _restart_when_training(url: str, cluster: PgCluster, done: threading.Event, outcome: dict[str, str]) -> None:
    deadline = time.monotonic() + 120
    while not done.is_set() and time.monotonic() < deadline:
        if _running_experiments(url):
            restarted = cluster.restart()  # the suite's own cluster, never the host's
            outcome["restart"] = f"rc={restarted.returncode} {restarted.stderr.strip()}"
            return
        time.sleep(0.2)
    outcome["restart"] = "never saw a running experiment"


def test_session_survives_a_postgres_restart_mid_experiment(
        tmp_path: Path, baseline_source: str, postgres_url: str, postgres_cluster: PgCluster,
        prepared_data: Path) -> None:
    """A restart during the baseline's training loses no row, doubles none, and the session completes."""
    workspace = Workspace.init(tmp_path / "ws", baseline_source=baseline_source)
    settings = tiny_settings(workspace.root, empty_database(postgres_url), prepared_data)
    done, outcome = threading.Event(), {}
    restarter = threading.Thread(target=_restart_when_training, args=(settings.database_url, postgres_cluster, done, outcome))
    restarter.start()
    try:
        summary, rows = run_session(settings, candidates=1)
    finally:
        done.set()
        restarter.join(timeout=90)
    assert outcome["restart"] == "rc=0 ", outcome
    assert summary.status == "completed", summary.stop_reason
    assert [(r.kind, r.attempt) for r in rows] == [("baseline", 1), ("candidate", 1)]
    assert rows[0].status == "kept" and rows[1].status in ("kept", "discarded")
    assert len({r.source_hash for r in rows if r.kind == "candidate"}) == 1
    tsv = workspace.results_path.read_text().splitlines()
    assert len(tsv) == 1 + len(rows)
