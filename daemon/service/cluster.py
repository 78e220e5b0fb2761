"""The daemon's side of the Slurm backend: its options from settings, and the checks made before any run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.errors import ConfigError
from sandbox import labels as L
from sandbox.base import Backend
from sandbox.errors import BackendUnavailable
from sandbox.slurm import SlurmBackend, SlurmOptions
from sandbox.spec import RunSpec


def slurm_options(settings: Settings) -> SlurmOptions:
    """`SlurmOptions` from the `[slurm]` section (shared_dir is required when the backend is slurm)."""
    slurm = settings.slurm
    if slurm.shared_dir is None:
        raise ConfigError("the slurm backend needs slurm.shared_dir (a directory every node sees at the same path)")
    return SlurmOptions(
        shared_dir=slurm.shared_dir, partition=slurm.partition, qos=slurm.qos, account=slurm.account,
        gres=slurm.gres, node_paths=tuple(slurm.node_paths), time_slack_s=slurm.time_slack_s, poll_s=slurm.poll_s,
        extra_args=tuple(slurm.extra_args), slurm_conf=slurm.slurm_conf, jobcomp_log=slurm.jobcomp_log)


def require_node_paths(backend: Backend, paths: list[Path]) -> None:
    """With the slurm backend, refuse before any run the folders the compute nodes would not see."""
    if not isinstance(backend, SlurmBackend):
        return
    try:
        backend.require_shared(paths)
    except BackendUnavailable as exc:
        raise ConfigError(str(exc), hint="see deploy/slurm/README.md (the shared directory)") from None


def record_jobs(backend: Backend, store: Any) -> None:
    """Store each stage's Slurm job id on its experiment as soon as it is submitted (crash-safe bookkeeping)."""
    from daemon.store.sandbox_jobs import add_sandbox_job

    if not isinstance(backend, SlurmBackend):
        return

    def submitted(spec: RunSpec, job_id: str) -> None:
        experiment = spec.labels.get(L.EXPERIMENT, "")
        if experiment.isdigit():
            add_sandbox_job(store, int(experiment), spec.labels.get(L.STAGE, "stage"), job_id)

    backend.on_submitted = submitted
