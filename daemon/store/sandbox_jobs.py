"""Record a stage's sandbox handle (its Slurm job id) on its experiment the moment it is submitted."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from daemon.store.models import ExperimentRow


def add_sandbox_job(store: Any, experiment_id: int, stage: str, handle: str) -> None:
    """Append `<stage>:<handle>` to `experiments.sandbox_jobs` (idempotent: a retried write adds it once)."""
    entry = f"{stage}:{handle}"

    def work(conn: Connection, retried: bool) -> None:
        current = conn.execute(select(ExperimentRow.sandbox_jobs).where(ExperimentRow.id == experiment_id)).scalar()
        entries = (current or "").split()
        if entry in entries:
            return
        conn.execute(update(ExperimentRow).where(ExperimentRow.id == experiment_id)
                     .values(sandbox_jobs=" ".join([*entries, entry])))

    # The store's own retried write transaction (one transaction, like every other store write).
    store._write(f"record sandbox job of experiment {experiment_id}", work)
