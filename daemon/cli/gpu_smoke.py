"""`autoresearch doctor --gpu`: a tiny train + eval on the CUDA path, through the configured sandbox.

It runs the baseline train.py (tiny shapes; on CUDA it still takes the GPU code path: bf16 autocast,
torch.compile, flex attention, export) and the trusted eval stage on the device, the way a night runs
them, and prints what a GPU user wants to know before leaving the daemon alone: did it work, how long did
compilation take, tokens/s and MFU. Without a GPU it says so and runs nothing.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.cli.check import FAIL, OK, WARN, Check
from daemon.cli.gpu_checks import PROBE_SOURCE, RUNTIME_FIX, container_checks, docker_info, runtime_check
from daemon.config import Settings
from sandbox import treewalk
from sandbox.gpu import GpuInfo, GpuProbe, NoGpuProbe

SMOKE_BUDGET_S = 20.0
SMOKE_EVAL_TOKENS = 65536
SMOKE_CORPUS_BYTES = 1_500_000
TRAINER_DIR = Path(__file__).resolve().parents[2] / "trainer"


@dataclass
class SmokeReport:
    """What the GPU smoke check saw; `ok` False with `reason` when it could not run or failed. `checks`: the
    first-run checks of the hardened container (daemon.cli.gpu_checks), before the baseline run."""

    ok: bool
    reason: str = ""
    gpu: str = ""
    figures: dict[str, float | str] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def render(self) -> str:
        head = f"GPU smoke check ({self.gpu}): {'passed' if self.ok else 'FAILED'}" if self.gpu else \
            f"GPU smoke check: {'passed' if self.ok else 'not run'}"
        lines = [head] + ([f"  {self.reason}"] if self.reason else [])
        lines += [f"  [{c.verdict}] {c.name}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "") for c in self.checks]
        lines += [f"  {key:<22} {value}" for key, value in self.figures.items()]
        return "\n".join(lines)


def first_run_checks(runner: Any, backend_name: str, gpu_uuid: str,
                     info: Callable[[], dict[str, Any]] = docker_info) -> list[Check]:
    """daemon.cli.gpu_checks 1-4 through the configured sandbox (Docker: the production path)."""
    if backend_name != "docker":
        return [Check("first-run checks", WARN, f"the {backend_name} backend is not the production path: the "
                      "hardened-container checks need Docker", "set [sandbox] backend = 'docker'")]
    try:
        checks = [runtime_check(info())]
    except Exception as exc:  # the engine did not answer: the baseline run below will say more
        checks = [Check("nvidia runtime", FAIL, f"`docker info` failed ({type(exc).__name__})", RUNTIME_FIX)]
    probe = runner.run(2, 1, PROBE_SOURCE, seed=0, gpu_uuid=gpu_uuid)
    return checks + container_checks(probe.log_tail, probe.error)


def probe_gpus() -> tuple[GpuProbe, list[GpuInfo], str]:
    """The NVML probe and its GPUs, or a NoGpuProbe and why there is none."""
    try:
        from sandbox.gpu import NvmlProbe

        probe: GpuProbe = NvmlProbe()
    except Exception as exc:  # no driver, no NVML library: a CPU machine
        return NoGpuProbe(), [], f"no GPU present ({str(exc)[:120]})"
    gpus = probe.gpus()
    return probe, gpus, "" if gpus else "no GPU present (NVML lists none)"


def smoke_data(cache: Path, progress: Callable[[str], None]) -> Path:
    """A small prepared corpus (stdlib sources, vocab 512) for the smoke run; prepared once, then reused."""
    from trainer.prepare import prepare_data

    corpus = cache / "smoke-corpus"
    if not corpus.is_dir():
        staging = Path(tempfile.mkdtemp(dir=cache))
        copied = 0
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            if path.stat().st_size <= 60_000 and copied < SMOKE_CORPUS_BYTES:
                shutil.copy(path, staging / path.name)
                copied += path.stat().st_size
        staging.rename(corpus)
    return prepare_data(str(corpus), cache / "smoke-data", vocab_size=512, progress=progress)


def run_gpu_smoke(settings: Settings, progress: Callable[[str], None] = print,
                  probe_result: tuple[GpuProbe, list[GpuInfo], str] | None = None) -> SmokeReport:
    """The first-run checks (daemon.cli.gpu_checks), then a tiny baseline trained and evaluated on the first GPU
    through the configured sandbox."""
    probe, gpus, why = probe_result if probe_result is not None else probe_gpus()
    if not gpus:
        return SmokeReport(False, f"{why}: the GPU smoke check needs an NVIDIA GPU and driver; nothing was run "
                                  "(CPU machines run `autoresearch once --budget 60` instead)")
    from daemon.research.runner import StageRunner
    from daemon.service.runtime import choose_backend
    from sandbox.spec import Limits

    gpu = gpus[0]
    cache = settings.workspace / ".smoke"
    cache.mkdir(parents=True, exist_ok=True)
    data = smoke_data(cache, progress)
    backend = choose_backend(settings, daemon=False)
    limits = Limits(timeout_s=SMOKE_BUDGET_S + settings.training.compile_budget_s + 120,
                    memory_bytes=int(settings.sandbox.memory_gb * 1024**3), cpus=float(os.cpu_count() or 1),
                    pids=settings.sandbox.pids, shm_bytes=int(settings.sandbox.shm_gb * 1024**3),
                    tmpfs_bytes=int(settings.sandbox.tmpfs_gb * 1024**3))
    env = {"AUTORESEARCH_TIME_BUDGET": str(SMOKE_BUDGET_S), "AUTORESEARCH_PRESET": "tiny",
           "AUTORESEARCH_COMPILE_BUDGET": str(settings.training.compile_budget_s),
           "AUTORESEARCH_EVAL_TOKENS": str(SMOKE_EVAL_TOKENS)}
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-", dir=cache))
    runner = StageRunner(backend, image=settings.sandbox.image, trainer_dir=TRAINER_DIR, data_dir=data,
                         work_dir=work, instance=f"{settings.instance_name}-smoke", train_limits=limits,
                         eval_limits=limits, env=env, gpu_probe=probe, compile_cache=cache / "compile-cache")
    progress(f"GPU smoke: tiny baseline for {SMOKE_BUDGET_S:.0f} s on {gpu.name} ({gpu.uuid}) through "
             f"the {backend.name} sandbox")
    started = time.monotonic()
    try:
        checks = first_run_checks(runner, backend.name, gpu.uuid)
        outcome = runner.run(1, 1, (TRAINER_DIR / "train.py").read_text(), seed=0, gpu_uuid=gpu.uuid)
    finally:
        treewalk.remove_tree(work)
    summary = outcome.summary
    figures: dict[str, float | str] = {
        "status": outcome.status, "val_bpb": outcome.val_bpb if outcome.val_bpb is not None else "-",
        "probe": outcome.probe or "-", "warm-up (compile) s": summary.get("warmup_seconds", "-"),
        "training s": summary.get("training_seconds", "-"), "steps": summary.get("num_steps", "-"),
        "tokens/s": round(summary["total_tokens_M"] * 1e6 / summary["training_seconds"])
        if summary.get("training_seconds") else "-",
        "MFU %": summary.get("mfu_percent", "-"), "peak memory MB": summary.get("peak_vram_mb", "-"),
        "eval s": round(outcome.eval_seconds, 1), "wall s": round(time.monotonic() - started, 1),
        "trust check": f"no: {SMOKE_EVAL_TOKENS} eval tokens check the code path, too few rows for the probe"}
    checks.append(Check("baseline on CUDA", OK if outcome.status == "ok" else FAIL,
                        f"export moved to CUDA and scored: {outcome.status}", "" if outcome.status == "ok" else
                        "see the reason above"))
    ok = all(check.verdict != FAIL for check in checks)
    reason = "" if outcome.status == "ok" else f"{outcome.error} {outcome.log_tail[-600:]}".strip()
    return SmokeReport(ok, reason, gpu.name, figures, checks)
