"""The NVML seam and the post-kill GPU release wait (a scripted probe stands in for NVML)."""

from __future__ import annotations

from sandbox.gpu import GpuInfo, NoGpuProbe, wait_for_gpu_release

UUID = "GPU-11111111-2222-3333-4444-555555555555"


class ScriptedProbe:
    """Reports the scripted used-memory figures one poll after another (the last one repeats)."""

    def __init__(self, used_mb: list[float]) -> None:
        self.used_mb = used_mb
        self.polls = 0

    def gpus(self) -> list[GpuInfo]:
        used = self.used_mb[min(self.polls, len(self.used_mb) - 1)]
        self.polls += 1
        return [GpuInfo(UUID, 0, "H100", used, 81559.0, 0.0)]

    def gpu_pids(self, uuid: str) -> list[int]:
        return []


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_release_seen_after_memory_drops() -> None:
    """Memory held by the killed context drains: the GPU is usable again."""
    probe, clock = ScriptedProbe([40000, 20000, 300]), FakeClock()
    assert wait_for_gpu_release(probe, UUID, timeout_s=10, clock=clock, sleep=clock.sleep)
    assert probe.polls == 3


def test_memory_never_released_means_quarantine() -> None:
    """A zombie context keeps memory past the bound: the helper says no (quarantine)."""
    clock = FakeClock()
    assert not wait_for_gpu_release(ScriptedProbe([40000]), UUID, timeout_s=5, clock=clock, sleep=clock.sleep)
    assert clock.now >= 5


def test_no_gpu_probe_sees_nothing() -> None:
    """On a CPU machine the probe lists no GPUs and no processes."""
    probe = NoGpuProbe()
    assert probe.gpus() == [] and probe.gpu_pids(UUID) == []
