"""Lanes: one per GPU (by UUID), or one CPU lane; a lane runs one experiment at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from daemon.errors import ConfigError
from sandbox.spec import Cancel


@dataclass(frozen=True)
class Lane:
    name: str  # metric label and experiments.lane: "gpu0", "gpu1", ... or "cpu"
    gpu_uuid: str | None


class GpuLister(Protocol):
    """The part of `sandbox.gpu.GpuProbe` lane planning needs."""

    def gpus(self) -> Sequence[object]: ...


class LaunchGate(Protocol):
    """Says whether a lane's GPU may take a new launch and can preempt its run (the scheduler)."""

    def may_launch(self, gpu_uuid: str) -> bool: ...

    def attach_run(self, gpu_uuid: str, cancel: Cancel) -> None: ...

    def detach_run(self, gpu_uuid: str) -> None: ...


def plan_lanes(configured_uuids: Sequence[str], probe: GpuLister | None) -> list[Lane]:
    """Lanes for the configured GPU UUIDs, else every GPU the probe sees, else one CPU lane."""
    seen = [str(getattr(info, "uuid", "")) for info in probe.gpus()] if probe is not None else []
    if configured_uuids:
        if len(set(configured_uuids)) != len(configured_uuids):
            raise ConfigError(f"gpus lists a GPU twice: {list(configured_uuids)}",
                              hint="name each GPU UUID once (a lane never shares its GPU)")
        unknown = [uuid for uuid in configured_uuids if seen and uuid not in seen]
        if unknown:
            raise ConfigError(f"gpus names GPUs this machine does not have: {unknown}",
                              hint=f"use UUIDs from `nvidia-smi -L`; seen here: {seen}")
        return [Lane(f"gpu{index}", uuid) for index, uuid in enumerate(configured_uuids)]
    if seen:
        return [Lane(f"gpu{index}", uuid) for index, uuid in enumerate(seen)]
    return [Lane("cpu", None)]


def cluster_lanes(max_jobs: int) -> list[Lane]:
    """Lanes of the Slurm backend: one per concurrent job (`slurm.max_jobs`); Slurm picks each job's GPU."""
    if max_jobs < 1:
        raise ConfigError(f"slurm.max_jobs must be at least 1, not {max_jobs}")
    return [Lane(f"slurm{index}", None) for index in range(max_jobs)]
