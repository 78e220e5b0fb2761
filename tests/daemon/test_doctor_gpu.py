"""`doctor`'s image line (torch/CUDA labels) and `doctor --gpu` on a machine without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.cli import doctor, gpu_smoke
from daemon.config import load_settings
from sandbox.gpu import NoGpuProbe
from sandbox.images import LABEL_PREFIX, TORCH_VERSION


def _labels(**values: str) -> dict[str, str]:
    return {f"{LABEL_PREFIX}{key}": value for key, value in values.items()}


def test_image_line_shows_torch_and_cuda_versions() -> None:
    """A labelled CUDA image reads as torch and CUDA versions, variant and base."""
    check = doctor.image_check("t:1", _labels(torch=TORCH_VERSION, torch_cuda="13.0", variant="cuda",
                                               base="debootstrap"))
    assert check.verdict == doctor.OK
    assert check.detail == f"t:1: torch {TORCH_VERSION}, CUDA 13.0 (cuda variant, debootstrap base)"
    cpu = doctor.image_check("t:2", _labels(torch=TORCH_VERSION, torch_cuda="none", variant="cpu", base="public"))
    assert "CPU build" in cpu.detail and cpu.verdict == doctor.OK


def test_unlabelled_or_other_torch_image_is_a_warning_with_the_fix() -> None:
    """An image from another recipe, or with another torch, says how to rebuild it."""
    plain = doctor.image_check("pytorch/pytorch:2.6.0", {"maintainer": "x"})
    assert plain.verdict == doctor.WARN and "autoresearch image build" in plain.fix
    old = doctor.image_check("t:3", _labels(torch="2.6.0", torch_cuda="12.4", variant="cuda", base="public"))
    assert old.verdict == doctor.WARN and TORCH_VERSION in old.fix


def test_gpu_smoke_without_a_gpu_runs_nothing_and_says_so(tmp_path: Path) -> None:
    """With no GPU the smoke check reports it clearly and creates no workspace files."""
    settings = load_settings(None, workspace=tmp_path / "ws")
    report = gpu_smoke.run_gpu_smoke(settings, probe_result=(NoGpuProbe(), [], "no GPU present (test)"))
    assert not report.ok and "no GPU present" in report.reason and "nothing was run" in report.reason
    assert "GPU smoke check: not run" in report.render()
    assert not (tmp_path / "ws").exists()


def test_doctor_gpu_on_this_machine(run_cli, tmp_path: Path) -> None:
    """`autoresearch doctor --gpu` on a machine without an NVIDIA GPU exits 1 saying no GPU is present."""
    _probe, gpus, _why = gpu_smoke.probe_gpus()
    if gpus:
        pytest.skip("this machine has a GPU: the smoke run itself is the device check")
    proc = run_cli("doctor", "--gpu", env={"AUTORESEARCH_METRICS__PORT": "0"})
    assert proc.returncode == 1
    assert "GPU smoke check: not run" in proc.stdout and "no GPU present" in proc.stdout


def test_doctor_refuses_a_night_that_cannot_fit_with_exit_2(run_cli, tmp_path: Path) -> None:
    """`autoresearch doctor` with an eval timeout below the projected eval: FAIL with the numbers, exit 2."""
    proc = run_cli("doctor", env={"AUTORESEARCH_METRICS__PORT": "0", "AUTORESEARCH_WORKSPACE": str(tmp_path / "ws"),
                                  "AUTORESEARCH_SANDBOX__EVAL_TIMEOUT_S": "5"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the night on this machine:" in proc.stdout and "over sandbox.eval_timeout_s = 5 s" in proc.stdout
    assert "fix: set sandbox.eval_timeout_s = 0" in proc.stdout


def test_doctor_shows_the_nights_plan(tmp_path: Path) -> None:
    """On a CPU machine with the defaults the plan is OK and names the eval size, its share and the timeout."""
    settings = load_settings(None, workspace=tmp_path / "ws")
    checks = doctor.check_capacity(settings, NoGpuProbe())
    assert all(check.verdict == doctor.OK for check in checks)
    text = " ".join(check.detail for check in checks)
    assert "rows of 1024" in text and "probe power" in text and "(derived)" in text
    assert doctor.exit_code(checks) == 0
