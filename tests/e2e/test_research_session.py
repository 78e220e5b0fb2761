"""End-to-end research sessions on real Postgres with real (tiny, CPU) training in the local sandbox."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.research import ResearchSession
from daemon.research.stop import StopCondition
from daemon.research.workspace import Workspace
from daemon.service.runtime import open_runtime
from daemon.store import open_store
from tests.e2e.support import empty_database, free_port

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

TINY_ENV = {
    "AUTORESEARCH_SANDBOX__BACKEND": "local",
    "AUTORESEARCH_TRAINING__PRESET": "tiny",
    "AUTORESEARCH_TRAINING__TIME_BUDGET_S": "2",
    "AUTORESEARCH_TRAINING__EVAL_TOKENS": "2048",
    "AUTORESEARCH_TRAINING__PROBE_FLOOR": "false",  # a 2-row eval: below the probe's floor, fine for this test
    "AUTORESEARCH_AGENT__PROVIDER": "offline",
}


@pytest.fixture()
def workspace(tmp_path: Path, baseline_source: str) -> Workspace:
    return Workspace.init(tmp_path / "ws", baseline_source=baseline_source)


@pytest.fixture()
def fresh_db(postgres_url: str) -> str:
    """The session database, emptied so each test starts with no sessions."""
    return empty_database(postgres_url)


def test_session_records_baseline_noise_candidate_and_serves_metrics(
        workspace: Workspace, prepared_data: Path, fresh_db: str) -> None:
    """A session runs baseline, noise floor and a candidate; DB, results.tsv and /metrics agree."""
    port = free_port()
    settings = load_settings(
        None, workspace=workspace.root, database={"url": fresh_db}, data={"dir": prepared_data},
        sandbox={"backend": "local"}, training={"preset": "tiny", "time_budget_s": 2, "eval_tokens": 2048, "probe_floor": False},
        agent={"provider": "offline"}, judge={"noise_runs": 1}, metrics={"port": port})
    runtime = open_runtime(settings, daemon=False)
    try:
        session = ResearchSession(
            settings=settings, store=runtime.store, workspace=runtime.workspace, runner=runtime.runner,
            agent=runtime.agent, lanes=runtime.lanes, owner=runtime.owner, metrics=runtime.metrics,
            heartbeat=runtime.heartbeat, max_experiments=1)
        session.open()
        summary = session.run(StopCondition(grace_s=30))
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        runtime.close()
    store = open_store(fresh_db)
    rows = sorted(store.list_experiments(session_id=summary.session_id, limit=100), key=lambda r: r.id)
    assert [(r.kind, r.status) for r in rows[:2]] == [("baseline", "kept"), ("noise", "measured")]
    assert rows[2].kind == "candidate"
    assert rows[2].status in ("kept", "discarded", "crashed", "timeout", "oom", "invalid")
    assert store.noise_floor(summary.session_id).n == 2
    assert summary.status == "completed"
    tsv = workspace.results_path.read_text().splitlines()
    assert tsv[0].split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert len(tsv) == 1 + len([r for r in rows if r.status not in ("queued", "running", "evaluating")])
    assert 'autoresearch_experiments_total{kind="baseline",lane="cpu",status="kept"} 1.0' in scraped
    assert f"autoresearch_baseline_val_bpb {rows[0].val_bpb}" in scraped


def test_sigkill_mid_experiment_then_restart_redoes_the_work(
        workspace: Workspace, prepared_data: Path, fresh_db: str, run_cli) -> None:
    """A daemon killed mid-experiment leaves an interrupted row; the restart resumes the session and redoes it."""
    env = {**TINY_ENV, "AUTORESEARCH_DATABASE__URL": fresh_db, "AUTORESEARCH_DATA__DIR": str(prepared_data),
           "AUTORESEARCH_WORKSPACE": str(workspace.root), "AUTORESEARCH_JUDGE__NOISE_RUNS": "0",
           "AUTORESEARCH_METRICS__PORT": "0", "PATH": os.environ["PATH"]}
    exe = Path(os.sys.executable).parent / "autoresearch"
    daemon = subprocess.Popen([str(exe), "once", "-n", "0"], cwd=workspace.root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = open_store(fresh_db)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                if store.list_experiments(status="running", limit=1):
                    break
            except Exception:  # the schema may not exist for the first moments
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the daemon never started an experiment")
        daemon.send_signal(signal.SIGKILL)
    finally:
        daemon.wait(timeout=30)
    done = run_cli("once", "-n", "0", env=env, cwd=workspace.root)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = sorted(store.list_experiments(limit=100), key=lambda r: r.id)
    assert len({r.session_id for r in rows}) == 1, "the restart must resume the same session"
    first, retry = rows[0], rows[1]
    assert first.status == "interrupted" and "stopped while this experiment ran" in first.error
    assert (retry.kind, retry.status, retry.attempt) == ("baseline", "kept", 2)
