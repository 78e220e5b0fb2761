"""`doctor --gpu` first-run checks: verdicts from FAKE `docker info` / probe reports (no GPU, no NVIDIA runtime
here), and the real probe script run on this CPU machine, directly and as a candidate through the train stage.
The success path in a real hardened CUDA container is UNVERIFIED until a lab server runs `doctor --gpu`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from daemon.cli import gpu_checks
from daemon.cli.doctor import FAIL, OK, WARN
from daemon.cli.gpu_smoke import first_run_checks
from daemon.research.runner import StageRunner
from sandbox.local_backend import LocalBackend
from tests.redteam.redteam_helpers import ENV, EVAL_LIMITS, REPO_ROOT, TRAIN_LIMITS

# FAKE: `docker info` of a lab server with the NVIDIA toolkit configured (trimmed to the keys read).
NVIDIA_INFO = {"Runtimes": {"io.containerd.runc.v2": {}, "nvidia": {"path": "nvidia-container-runtime"},
                            "runc": {}}, "DefaultRuntime": "runc"}


def _line(check: str, ok: bool, detail: str) -> str:
    return gpu_checks.REPORT_PREFIX + json.dumps({"check": check, "ok": ok, "detail": detail})


def test_runtime_registered_is_ok_and_missing_is_fail_with_the_fix() -> None:
    """nvidia in dockerd's runtimes: OK; only runc: FAIL naming nvidia-ctk; CDI dirs only: WARN."""
    assert gpu_checks.runtime_check(NVIDIA_INFO).verdict == OK
    missing = gpu_checks.runtime_check({"Runtimes": {"runc": {}}, "DefaultRuntime": "runc"})
    assert missing.verdict == FAIL and "nvidia-ctk runtime configure" in missing.fix
    assert gpu_checks.runtime_check({"Runtimes": {"runc": {}}, "CDISpecDirs": ["/etc/cdi"]}).verdict == WARN


def test_a_full_report_passes_every_container_check() -> None:
    """FAKE probe output of a working container: libcuda, Triton as the candidate uid, bounded workers."""
    output = "\n".join(["compile cache: cold", _line("libcuda", True, "['/usr/lib/x86_64-linux-gnu']"),
                        _line("triton", True, "kernel ran as uid 1001, 3 files"),
                        _line("compile_threads", True, "TORCHINDUCTOR_COMPILE_THREADS=4, CPU quota 4.0")])
    checks = gpu_checks.container_checks(output)
    assert [c.verdict for c in checks] == [OK, OK, OK] and all(c.fix == "" for c in checks)


def test_missing_or_failed_lines_fail_with_the_reason() -> None:
    """A failed line keeps its detail and gets the fix; a check with no line names the stage's failure."""
    output = _line("libcuda", False, "RuntimeError: libcuda.so cannot found!") + "\nGPUCHECK {not json"
    checks = {c.name: c for c in gpu_checks.container_checks(output, "train stage ended timeout")}
    assert checks["libcuda for Triton"].verdict == FAIL and "cannot found" in checks["libcuda for Triton"].detail
    assert "train stage ended timeout" in checks["Triton kernel as candidate"].detail


def test_the_probe_fails_each_gpu_check_on_this_cpu_machine(tmp_path: Path) -> None:
    """The real probe script without CUDA: libcuda and Triton FAIL with a reason; unset workers FAIL, set pass."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"}
    unset = subprocess.run([sys.executable, "-c", gpu_checks.PROBE_SOURCE], env=env, cwd=tmp_path, text=True,
                           capture_output=True, timeout=300, check=False)
    checks = {c.name: c for c in gpu_checks.container_checks(unset.stdout)}
    assert checks["libcuda for Triton"].verdict == FAIL and checks["libcuda for Triton"].detail
    assert checks["Triton kernel as candidate"].verdict == FAIL
    assert checks["compile workers"].verdict == FAIL and "(unset)" in checks["compile workers"].detail
    bounded = subprocess.run([sys.executable, "-c", gpu_checks.PROBE_SOURCE], cwd=tmp_path, text=True,
                             env={**env, "TORCHINDUCTOR_COMPILE_THREADS": "1"}, capture_output=True, timeout=300,
                             check=False)
    assert {c.name: c for c in gpu_checks.container_checks(bounded.stdout)}["compile workers"].verdict == OK


def test_probe_as_a_candidate_sees_workers_bounded_by_the_harness(prepared_data: Path, tmp_path: Path) -> None:
    """Through the real train stage (local backend) the harness has set the compile workers from the quota."""
    runner = StageRunner(LocalBackend("gpuchecks"), image="", trainer_dir=REPO_ROOT / "trainer",
                         data_dir=prepared_data, work_dir=tmp_path, instance="gpuchecks", train_limits=TRAIN_LIMITS,
                         eval_limits=EVAL_LIMITS, env=ENV)
    outcome = runner.run(9901, 1, gpu_checks.PROBE_SOURCE, 0)
    checks = {c.name: c for c in gpu_checks.container_checks(outcome.log_tail, outcome.error)}
    assert checks["compile workers"].verdict == OK, checks["compile workers"].detail
    assert checks["libcuda for Triton"].verdict == FAIL


def test_first_run_checks_off_docker_say_they_are_not_the_production_path() -> None:
    """With the local backend nothing is probed: one WARN that the hardened-container checks need Docker."""
    [check] = first_run_checks(None, "local", "GPU-0")
    assert check.verdict == WARN and "Docker" in check.detail
