"""Helpers shared by the end-to-end modules: settings for tiny real sessions, a handicapped baseline, ports."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path
from typing import Any

import sqlalchemy

from daemon.config import Settings, load_settings
from daemon.research import ResearchSession, SessionSummary
from daemon.research.stop import StopCondition
from daemon.service.runtime import open_runtime
from daemon.store import open_store
from daemon.store.records import ExperimentRecord

# Learning rates this small leave the model at its initial loss: any sane train.py beats it clearly.
HANDICAPPED_LRS = {"EMBEDDING_LR": "1e-07", "UNEMBEDDING_LR": "1e-07", "SCALAR_LR": "1e-07", "MATRIX_LR": "1e-07"}


def handicapped(baseline_source: str) -> str:
    """The baseline train.py with absurdly small learning rates (a baseline that is easy to beat)."""
    source = baseline_source
    for name, value in HANDICAPPED_LRS.items():
        source, count = re.subn(rf"^{name} = [0-9.e-]+", f"{name} = {value}", source, flags=re.MULTILINE)
        assert count == 1, f"{name} not found once in trainer/train.py"
    return source


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def empty_database(url: str) -> str:
    """Drop every table of the test database so a module starts with no sessions; returns the URL."""
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return url


def tiny_settings(workspace: Path, database_url: str, data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """Settings of a tiny real CPU session (2 s budget, 2048 eval tokens); `sections` override per section."""
    base: dict[str, dict[str, Any]] = {
        "database": {"url": database_url, "retry_seconds": 60},
        "data": {"dir": data_dir},
        "sandbox": {"backend": "local", "cpus": 2},
        # Smoke runs off unless a test is about them: they would add a run per candidate.
        "training": {"preset": "tiny", "time_budget_s": 2, "eval_tokens": 2048, "probe_floor": False, "smoke": False},
        "agent": {"provider": "offline"},
        "judge": {"noise_runs": 0},
        "metrics": {"port": 0},
        "scheduler": {"grace_s": 60},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_settings(None, workspace=workspace, instance="e2e", **base)


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as AUTORESEARCH_* variables, for the real CLI in a subprocess."""
    env = {"AUTORESEARCH_WORKSPACE": str(settings.workspace), "AUTORESEARCH_INSTANCE": settings.instance_name}
    sections = {"database": settings.database, "data": settings.data, "sandbox": settings.sandbox,
                "training": settings.training, "judge": settings.judge, "metrics": settings.metrics}
    for name, section in sections.items():
        for key, value in section.model_dump(mode="json", exclude_none=True).items():
            env[f"AUTORESEARCH_{name.upper()}__{key.upper()}"] = str(value)
    env["AUTORESEARCH_AGENT__PROVIDER"] = "offline"
    env["AUTORESEARCH_SCHEDULER__GRACE_S"] = str(settings.scheduler.grace_s)
    return env


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def run_session(settings: Settings, candidates: int) -> tuple[SessionSummary, list[ExperimentRecord]]:
    """Run one real session in this process (as `autoresearch once -n N` does); its experiments, oldest first."""
    runtime = open_runtime(settings, daemon=False)
    try:
        session = ResearchSession(
            settings=settings, store=runtime.store, workspace=runtime.workspace, runner=runtime.runner,
            agent=runtime.agent, lanes=runtime.lanes, owner=runtime.owner, metrics=runtime.metrics,
            heartbeat=runtime.heartbeat, max_experiments=candidates, cost_since=runtime.cost_since)
        session.open()
        summary = session.run(StopCondition(grace_s=settings.scheduler.grace_s))
    finally:
        runtime.close()
    store = open_store(settings.database_url)
    try:
        rows = store.list_experiments(session_id=summary.session_id, limit=1000)
    finally:
        store.close()
    return summary, sorted(rows, key=lambda r: r.id)


def agent_calls(database_url: str, session_id: int) -> list[dict[str, Any]]:
    """The session's agent_calls rows, oldest first."""
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as conn:
            result = conn.execute(sqlalchemy.text("SELECT * FROM agent_calls WHERE session_id = :sid ORDER BY id"),
                                  {"sid": session_id})
            return [dict(row._mapping) for row in result]
    finally:
        engine.dispose()
