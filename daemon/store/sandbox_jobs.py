"""Record a stage's sandbox handle (its Slurm job id) on its experiment the moment it is submitted."""

from __future__ import annotations

from typing import Protocol


class _Recorder(Protocol):
    def record_sandbox_job(self, experiment_id: int, stage: str, handle: str) -> None: ...


def add_sandbox_job(store: _Recorder, experiment_id: int, stage: str, handle: str) -> None:
    """Append `<stage>:<handle>` to `experiments.sandbox_jobs` (idempotent: a retried write adds it once)."""
    store.record_sandbox_job(experiment_id, stage, handle)
