"""No silent CPU fallback: a stage the daemon started on a GPU lane checks, before anything runs, that CUDA works.

The daemon sets AUTORESEARCH_REQUIRE_CUDA=1 on every stage of a GPU lane. Without this check, a container that
sees no CUDA device (driver older than the image's CUDA, the NVIDIA runtime not registered with dockerd, a CPU
image) would train the cpu preset and score it on the CPU: a whole night of meaningless runs. With it, the
stage exits EXIT_NO_CUDA with one line saying why, and the daemon records `infra_error`.

The check does not import torch (the train stage's harness stays small): it reads the CUDA version torch was
built for from torch/version.py and asks the CUDA driver (libcuda, through ctypes) for its version and devices.
At the same call (`stage_start`) the harness bounds Inductor's compile workers by the container's CPU quota.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import re
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

REQUIRE_ENV = "AUTORESEARCH_REQUIRE_CUDA"
EXIT_NO_CUDA = 17  # the stage refused to start: a GPU lane without a usable CUDA device (daemon: infra_error)
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100
# The newest driver a CUDA major version of torch's wheels needs (NVIDIA's table; Linux).
MIN_DRIVER_FOR_CUDA = {13: 580, 12: 525}


class CudaDriver(Protocol):
    """The few CUDA driver calls the check makes (libcuda in production, a fake in tests)."""

    def init(self) -> int: ...  # cuInit(0): 0 or a CUresult
    def driver_version(self) -> int: ...  # cuDriverGetVersion: e.g. 12080 for CUDA 12.8
    def device_count(self) -> int: ...


@dataclass(frozen=True)
class LibCuda:
    """The real driver, through ctypes."""

    lib: ctypes.CDLL

    def init(self) -> int:
        return int(self.lib.cuInit(0))

    def driver_version(self) -> int:
        version = ctypes.c_int(0)
        return version.value if self.lib.cuDriverGetVersion(ctypes.byref(version)) == 0 else 0

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        return count.value if self.lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0


def load_libcuda() -> CudaDriver | None:
    """libcuda.so.1 as the NVIDIA container runtime mounts it, or None when it is not there."""
    try:
        return LibCuda(ctypes.CDLL("libcuda.so.1"))
    except OSError:
        return None


def torch_cuda_version(torch_dir: Path | None = None) -> str | None:
    """The CUDA version torch was built for ('13.0'), None for a CPU build or without torch; no import."""
    if torch_dir is None:
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.origin is None:
            return None
        torch_dir = Path(spec.origin).parent
    try:
        text = (torch_dir / "version.py").read_text()
    except OSError:
        return None
    found = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([0-9.]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else None


def cuda_problem(torch_cuda: str | None, driver: CudaDriver | None) -> str | None:
    """Why this container cannot run CUDA (one line with the fix), or None when it can."""
    if torch_cuda is None:
        return ("the image's torch is a CPU build (CPU image) on a GPU lane: build the CUDA image "
                "(`autoresearch image build --variant cuda`) and set sandbox.image to it")
    if driver is None:
        return ("libcuda.so.1 is not visible in the container: the NVIDIA container runtime is not registered "
                "with dockerd, or the container got no GPU (run `autoresearch doctor --gpu`; install "
                "nvidia-container-toolkit and `nvidia-ctk runtime configure --runtime=docker`)")
    major = int(torch_cuda.split(".")[0])
    version = driver.driver_version()
    driver_major = version // 1000
    status = driver.init()
    if status == CUDA_ERROR_INSUFFICIENT_DRIVER or (version and driver_major < major):
        shown = f"CUDA {driver_major}.{version % 1000 // 10}" if version else "an older CUDA"
        return (f"the host driver supports {shown}, older than the image's CUDA {torch_cuda} (driver >= "
                f"{MIN_DRIVER_FOR_CUDA.get(major, '?')} needed): upgrade the driver or rebuild the image with the "
                "`--torch-index` that fits it (`autoresearch image build` names it)")
    if status == CUDA_ERROR_NO_DEVICE or (status == 0 and driver.device_count() == 0):
        return ("the CUDA driver sees no device in the container: the GPU was not passed in (--gpus / "
                "NVIDIA_VISIBLE_DEVICES) or the NVIDIA runtime is not the one that started it")
    if status != 0:
        return f"cuInit failed with CUDA error {status}: see `nvidia-smi` on the host and `autoresearch doctor --gpu`"
    return None


def require_cuda(env: Mapping[str, str], driver_loader: Callable[[], CudaDriver | None] = load_libcuda,
                 torch_dir: Path | None = None) -> str | None:
    """The harness's check at stage start: None when CUDA is not required or works, else the reason."""
    if env.get(REQUIRE_ENV, "").strip() != "1":
        return None
    return cuda_problem(torch_cuda_version(torch_dir), driver_loader())


# ---------------------------------------------------------------------------------------------
# Compile workers bounded by the container's CPU quota

COMPILE_THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"


def cpu_quota(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs this container may use by its cgroup quota (v2 cpu.max or v1 cfs quota/period), None: no quota."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (cgroup_root / "cpu", cgroup_root / "cpu,cpuacct", cgroup_root):
        try:
            quota_us = int((folder / "cpu.cfs_quota_us").read_text())
            period_us = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 else quota_us / period_us
    return None


def compile_threads(quota: float | None, cpu_count: int) -> int:
    """Inductor's compile workers for this quota: whole CPUs of it, at least 1 (without a quota: the CPUs)."""
    limit = cpu_count if quota is None else min(cpu_count, math.floor(quota))
    return max(1, limit)


def bound_compile_threads(env: MutableMapping[str, str], cgroup_root: Path = Path("/sys/fs/cgroup")) -> None:
    """Set TORCHINDUCTOR_COMPILE_THREADS from the quota unless set (Inductor starts up to 32 workers otherwise,
    each holding memory, whatever the quota)."""
    if not env.get(COMPILE_THREADS_ENV, "").strip():
        env[COMPILE_THREADS_ENV] = str(compile_threads(cpu_quota(cgroup_root), os.cpu_count() or 1))


def stage_start(env: MutableMapping[str, str]) -> str | None:
    """The harness's one call at stage start: bound the compile workers, then require CUDA on a GPU lane
    (None: go on; else the reason the stage must not run)."""
    bound_compile_threads(env)
    return require_cuda(env)
