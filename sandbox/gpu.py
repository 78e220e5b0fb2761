"""The NVML seam: which GPUs exist, who uses them, and whether a killed run released its memory.

`NvmlProbe` talks to the driver through pynvml (nvidia-ml-py); `NoGpuProbe` is the CPU-machine probe.
Tests replace the probe with a scripted fake at this seam only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from sandbox.errors import BackendUnavailable


@dataclass(frozen=True)
class GpuInfo:
    uuid: str
    index: int
    name: str
    memory_used_mb: float
    memory_total_mb: float
    utilization: float  # percent, 0..100


class GpuProbe(Protocol):
    def gpus(self) -> list[GpuInfo]: ...

    def gpu_pids(self, uuid: str) -> list[int]:
        """Every process (compute and graphics) that holds a context on this GPU now, ours included."""
        ...


def foreign_pids(probe: GpuProbe, uuid: str, own_pids: Callable[[], Collection[int]]) -> list[int]:
    """The processes on `uuid` that are not ours, decided so that our own sandbox never counts as foreign.

    Our PIDs are read *after* the GPU's process list, never before: a process of ours that the driver lists
    already existed when the list was taken, so it is still in our (later) set unless it has exited. A PID
    that looks foreign is confirmed by a second look (process list, then our PIDs again): one that has exited
    in between (a short-lived process of ours, gone before our set was read) is no longer listed, and one of
    ours that started in between is in the second set. Only a PID listed twice and never ours is foreign.
    """
    suspects = set(probe.gpu_pids(uuid)) - set(own_pids())
    if not suspects:
        return []
    still_listed = set(probe.gpu_pids(uuid))
    return sorted((suspects & still_listed) - set(own_pids()))


class NoGpuProbe:
    """A machine without NVIDIA GPUs: no GPUs, no processes."""

    def gpus(self) -> list[GpuInfo]:
        return []

    def gpu_pids(self, uuid: str) -> list[int]:
        return []


class NvmlProbe:
    """The real probe. Raises `BackendUnavailable` when the NVIDIA driver library is missing."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:
            raise BackendUnavailable(f"NVML not available ({exc}); is the NVIDIA driver installed?") from None
        self._nvml: Any = pynvml

    def _handle(self, uuid: str) -> Any:
        return self._nvml.nvmlDeviceGetHandleByUUID(uuid)

    def gpus(self) -> list[GpuInfo]:
        nvml = self._nvml
        found = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            name = nvml.nvmlDeviceGetName(handle)
            found.append(GpuInfo(
                uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                index=index,
                name=name.decode() if isinstance(name, bytes) else name,
                memory_used_mb=memory.used / 2**20,
                memory_total_mb=memory.total / 2**20,
                utilization=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            ))
        return found

    def gpu_pids(self, uuid: str) -> list[int]:
        handle = self._handle(uuid)
        processes = [
            *self._nvml.nvmlDeviceGetComputeRunningProcesses(handle),
            *self._nvml.nvmlDeviceGetGraphicsRunningProcesses(handle),
        ]
        return sorted({p.pid for p in processes})


def wait_for_gpu_release(probe: GpuProbe, uuid: str, *, timeout_s: float, max_used_mb: float = 1024.0,
                         poll_s: float = 0.5, clock: Callable[[], float] = time.monotonic,
                         sleep: Callable[[float], None] = time.sleep) -> bool:
    """After a killed run: True once the GPU's used memory drops to `max_used_mb`, False at `timeout_s`.

    False means the caller must quarantine the GPU (report it, start nothing on it) instead of
    launching the next run onto memory a zombie context still holds.
    """
    deadline = clock() + timeout_s
    while True:
        info = next((g for g in probe.gpus() if g.uuid == uuid), None)
        if info is None or info.memory_used_mb <= max_used_mb:
            return True
        if clock() >= deadline:
            return False
        sleep(poll_s)
