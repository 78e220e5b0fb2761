"""The daemon's side of the Slurm backend: its options from settings, and the checks made before any run."""

from __future__ import annotations

from pathlib import Path

from daemon.config import Settings
from daemon.errors import ConfigError
from sandbox.base import Backend
from sandbox.errors import BackendUnavailable
from sandbox.slurm import SlurmBackend, SlurmOptions


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
