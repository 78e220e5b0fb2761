"""Fixtures for the daemon's loop tests: a database of their own, a workspace, tiny CPU settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings, load_settings
from daemon.research.workspace import Workspace
from tests.conftest import scratch_database

# Smoke runs off unless a test is about them: they would add a run per candidate.
# probe_floor off: a 2-row eval checks the code path, not causality (trainer.probe_power).
TINY_TRAINING = {"preset": "tiny", "time_budget_s": 2, "eval_tokens": 2048, "probe_floor": False, "smoke": False}


@pytest.fixture()
def own_db(postgres_url: str) -> Iterator[str]:
    """A fresh Postgres database for one test (no other test's sessions in it), dropped afterwards."""
    with scratch_database("autoresearch_loop") as url:
        yield url


@pytest.fixture()
def workspace(tmp_path: Path, baseline_source: str) -> Workspace:
    return Workspace.init(tmp_path / "ws", baseline_source=baseline_source)


@pytest.fixture()
def tiny_settings(workspace: Workspace, prepared_data: Path, own_db: str) -> Any:
    """Settings for an in-process session: local sandbox, tiny CPU training, offline agent, no noise runs."""

    def make(**overrides: Any) -> Settings:
        sections: dict[str, Any] = {
            "workspace": workspace.root, "database": {"url": own_db}, "data": {"dir": prepared_data},
            "sandbox": {"backend": "local"}, "training": dict(TINY_TRAINING), "agent": {"provider": "offline"},
            "judge": {"noise_runs": 0}, "metrics": {"port": 0},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(sections.get(key), dict):
                sections[key] = {**sections[key], **value}
            else:
                sections[key] = value
        return load_settings(None, **sections)

    return make
