"""No silent CPU fallback: the stage-start CUDA check, with a fake CUDA driver at the edge (no GPU here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer import device_check, harness
from trainer.device_check import REQUIRE_ENV, cuda_problem, require_cuda, torch_cuda_version


@dataclass
class FakeDriver:
    """libcuda's answers on a lab server, scripted (FAKE: no CUDA driver on this machine)."""

    init_status: int = 0
    version: int = 13000
    devices: int = 1

    def init(self) -> int:
        return self.init_status

    def driver_version(self) -> int:
        return self.version

    def device_count(self) -> int:
        return self.devices


def _torch_dir(tmp_path: Path, cuda: str | None) -> Path:
    folder = tmp_path / "torch"
    folder.mkdir(parents=True)
    value = repr(cuda) if cuda is not None else "None"
    (folder / "version.py").write_text(f"__version__ = '2.13.0'\ncuda: Optional[str] = {value}\nhip = None\n")
    return folder


def test_a_working_device_passes() -> None:
    """Driver new enough, one device, CUDA build: no problem."""
    assert cuda_problem("13.0", FakeDriver()) is None


def test_each_failure_names_its_cause_and_fix() -> None:
    """CPU image, no libcuda (runtime), driver too old, no device: each says which and what to do."""
    assert "CPU image" in (cuda_problem(None, FakeDriver()) or "")
    assert "NVIDIA container runtime" in (cuda_problem("13.0", None) or "")
    old = cuda_problem("13.0", FakeDriver(init_status=device_check.CUDA_ERROR_INSUFFICIENT_DRIVER, version=12080))
    assert old is not None and "CUDA 12.8" in old and "580" in old and "--torch-index" in old
    assert "older" in (cuda_problem("13.0", FakeDriver(version=12020)) or "")
    assert "no device" in (cuda_problem("12.8", FakeDriver(init_status=device_check.CUDA_ERROR_NO_DEVICE)) or "")
    assert "no device" in (cuda_problem("12.8", FakeDriver(devices=0)) or "")
    assert "error 999" in (cuda_problem("12.8", FakeDriver(init_status=999)) or "")


def test_torch_cuda_version_is_read_without_importing_torch(tmp_path: Path) -> None:
    """torch/version.py's cuda field: '13.0' for a CUDA build, None for a CPU build or a missing file."""
    assert torch_cuda_version(_torch_dir(tmp_path / "a", "13.0")) == "13.0"
    assert torch_cuda_version(_torch_dir(tmp_path / "b", None)) is None
    assert torch_cuda_version(tmp_path / "nowhere") is None


def test_installed_torch_is_read_as_torch_says() -> None:
    """On the real install the parsed version is torch.version.cuda."""
    import torch

    assert torch_cuda_version() == torch.version.cuda


def test_only_gpu_lanes_require_cuda(tmp_path: Path) -> None:
    """Without AUTORESEARCH_REQUIRE_CUDA=1 nothing is checked; with it the driver is asked."""
    assert require_cuda({}, lambda: None, _torch_dir(tmp_path, None)) is None
    assert require_cuda({REQUIRE_ENV: "1"}, FakeDriver, _torch_dir(tmp_path / "x", "13.0")) is None
    assert require_cuda({REQUIRE_ENV: "1"}, lambda: None, _torch_dir(tmp_path / "y", "13.0")) is not None


def test_harness_refuses_both_stages_on_this_cpu_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Real edge: this machine has no CUDA, so a GPU lane's train and eval stages stop with EXIT_NO_CUDA."""
    if device_check.cuda_problem(torch_cuda_version(), device_check.load_libcuda()) is None:
        pytest.skip("this machine has a working CUDA device")
    monkeypatch.setenv(REQUIRE_ENV, "1")
    candidate = tmp_path / "train.py"
    candidate.write_text("raise SystemExit('the candidate must not run')\n")
    for argv in (["train", "--candidate", str(candidate), "--data", str(tmp_path), "--out", str(tmp_path / "o")],
                 ["eval", "--checkpoint", str(tmp_path / "m.pt2"), "--data", str(tmp_path), "--out", str(tmp_path)]):
        assert harness.main(argv) == device_check.EXIT_NO_CUDA
    out = capsys.readouterr().out
    assert out.count("no CUDA device on a GPU lane:") == 2 and "must not run" not in out
    assert not (tmp_path / "o").exists()


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    """FAKE at the edge: a cgroup folder as the kernel shows it inside a container."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path: Path) -> None:
    """cpu.max '250000 100000' is 2.5 CPUs, 'max' no quota; v1 quota/period likewise, -1 no quota."""
    assert device_check.cpu_quota(_cgroup(tmp_path / "a", {"cpu.max": "250000 100000\n"})) == 2.5
    assert device_check.cpu_quota(_cgroup(tmp_path / "b", {"cpu.max": "max 100000\n"})) is None
    v1 = _cgroup(tmp_path / "c", {"cpu,cpuacct/cpu.cfs_quota_us": "400000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert device_check.cpu_quota(v1) == 4.0
    none = _cgroup(tmp_path / "d", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert device_check.cpu_quota(none) is None


def test_compile_threads_follow_the_quota(tmp_path: Path) -> None:
    """A 2.5-CPU quota on a 32-CPU host gives 2 workers; a set value is kept; no quota: the CPU count."""
    assert device_check.compile_threads(2.5, 32) == 2 and device_check.compile_threads(0.5, 32) == 1
    assert device_check.compile_threads(None, 8) == 8
    env: dict[str, str] = {}
    device_check.bound_compile_threads(env, _cgroup(tmp_path, {"cpu.max": "250000 100000\n"}))
    assert env == {device_check.COMPILE_THREADS_ENV: "2"}
    kept = {device_check.COMPILE_THREADS_ENV: "1"}
    device_check.bound_compile_threads(kept, tmp_path)
    assert kept[device_check.COMPILE_THREADS_ENV] == "1"
