"""One experiment through the sandbox: the train stage (candidate), then the eval stage (trusted harness).

The research loop calls `StageRunner.run` and gets a `StageOutcome` whose status maps onto the store's
experiment statuses. `val_bpb` comes only from the eval stage's `result.json`; whatever the candidate
prints is informational. The candidate's environment is minimal and the eval settings never reach it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from daemon.research.replay import ReplayGuard, Replays
from sandbox import labels
from sandbox.base import Backend
from sandbox.gpu import GpuProbe, wait_for_gpu_release
from sandbox.outfiles import is_safe_regular_file, out_dir_size, remove_tree
from sandbox.sanitize import clean_line, clean_summary, clean_text
from sandbox.spec import PRIVATE_DIR, Cancel, Limits, Mount, RunResult, RunSpec, RunStatus
from trainer.clock import DEFAULT_COMPILE_BUDGET, SLACK_FRACTION, SLACK_MIN_SECONDS
from trainer.compile_cache import CACHE_ENV, PUBLISH_ENV, PUBLISHED_DIR, harvest
from trainer.device_check import EXIT_NO_CUDA, REQUIRE_ENV
from trainer.probe_power import EXIT_PROBE_POWER, FLOOR_ENV

TRAINER_TARGET = "/opt/autoresearch/trainer"
# The harness's one clock (trainer.clock): exit 5 is "over budget" (the candidate ran into the hard deadline,
# compile budget + budget + slack after its start); from outside, the container may not outlive that deadline
# plus this grace (the harness's own start, its copy of the compile cache, the kills, the checkpoint's copy).
EXIT_OVER_BUDGET = 5
CONTAINER_GRACE_SECONDS = 60.0
EXIT_OUT_QUOTA = 6               # the harness killed a candidate whose out dir passed its total quota
OUT_QUOTA_BYTES = 16 * 1024**3   # as trainer/harness.py; AUTORESEARCH_OUT_QUOTA overrides both
OUT_QUOTA_SLACK_BYTES = 64 * 1024**2
# The candidate's work dir (a tmpfs the kernel sizes: its quota) holds the checkpoint, which the per-file limit caps,
# and this much beside it (logs, small files). The compile caches live in the stage's /tmp tmpfs (tmpfs_bytes).
WORK_HEADROOM_BYTES = 256 * 1024**2
CACHE_TARGET = "/cache"  # the lane's compile cache, read-only
CHECKPOINT_NAME = "model.pt2"
# Only these reach the candidate; AUTORESEARCH_EVAL_TOKENS is for the eval stage alone. The eval stage also gets
# the preset, from which it decides the scoring shape itself (trainer.prepare.scoring_seq_len).
TRAIN_ENV_KEYS = ("AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_COMPILE_BUDGET", "AUTORESEARCH_PRESET",
                  "AUTORESEARCH_OUT_QUOTA", REQUIRE_ENV)
EVAL_ENV_KEYS = ("AUTORESEARCH_EVAL_TOKENS", "AUTORESEARCH_PRESET", FLOOR_ENV, REQUIRE_ENV)
TRAIN_COMMAND = ("python3", "-m", "trainer.harness", "train", "--candidate", "/candidate/train.py",
                 "--data", "/data", "--out", "/out")
# The eval stage splits into a trusted scorer and an untrusted model process (trainer.privsep): the val split
# and the out dir sit under the scorer's private folder, out of the model process's reach.
EVAL_DATA, EVAL_OUT = f"{PRIVATE_DIR}/data", f"{PRIVATE_DIR}/out"
EVAL_COMMAND = ("python3", "-m", "trainer.harness", "eval", "--checkpoint", f"/checkpoint/{CHECKPOINT_NAME}",
                "--data", EVAL_DATA, "--out", EVAL_OUT)
_KILLED = (RunStatus.TIMEOUT, RunStatus.OOM, RunStatus.PREEMPTED, RunStatus.INTERRUPTED)
_TRAIN_STATUS = {
    RunStatus.FAILED: "crashed",
    RunStatus.TIMEOUT: "timeout",
    RunStatus.OOM: "oom",
    RunStatus.PREEMPTED: "preempted",
    RunStatus.INTERRUPTED: "interrupted",
    RunStatus.INFRA_ERROR: "infra_error",
}


@dataclass(frozen=True)
class StageOutcome:
    """What one experiment's two stages produced, classified for the store."""

    status: str  # ok | crashed | timeout | oom | invalid | interrupted | preempted | infra_error
    val_bpb: float | None
    summary: dict[str, float]
    train: RunResult
    eval: RunResult | None
    probe: str
    error: str
    log_tail: str
    eval_seconds: float
    overhead_seconds: dict[str, float]
    gpu_quarantined: bool = field(default=False)


def _json_file(result: RunResult, name: str) -> dict[str, Any] | None:
    raw = result.files.get(name)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _finite(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _finite_setting(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def _harness_refusal(stage: str, result: RunResult, report: Path) -> str | None:
    """Why the trusted harness refused to start a stage on this machine (a GPU lane without CUDA, an eval too
    small for the causality probe): an infra_error, never the candidate's doing. Only when the harness wrote
    no JSON: a candidate that ran (and so could choose its exit status) always leaves the harness's train.json."""
    refusals = {EXIT_NO_CUDA: "no CUDA device on a GPU lane:", EXIT_PROBE_POWER: "refusing to score:"}
    if result.status is not RunStatus.FAILED or result.exit_code not in refusals or report.name in result.files \
            or os.path.lexists(report):
        return None
    marker = refusals[result.exit_code]
    lines = [line for line in result.output_tail.splitlines() if marker in line]
    return f"{stage} stage refused to start: {lines[-1].strip() if lines else marker + ' (exit ' + str(result.exit_code) + ')'}"


def _stage_failure(stage: str, result: RunResult) -> str:
    """Why a stage failed: its status and exit code first, then any sandbox notes (refused out files...)."""
    reason = f"{stage} stage ended {result.status.value} (exit {result.exit_code})"
    return f"{reason}: {result.error}" if result.error else reason


class StageRunner:
    """Runs experiments' train and eval stages on one backend, in per-run folders under `work_dir`."""

    def __init__(self, backend: Backend, *, image: str, trainer_dir: Path, data_dir: Path, work_dir: Path,
                 instance: str, train_limits: Limits, eval_limits: Limits, env: dict[str, str],
                 gpu_probe: GpuProbe | None = None, gpu_release_timeout_s: float = 60.0,
                 compile_cache: Path | None = None, replays: Replays | None = None, require_cuda: bool = True) -> None:
        for split in ("train", "val"):
            if not (data_dir / split).is_dir():
                from daemon.errors import WorkspaceError

                raise WorkspaceError(f"prepared data has no {split}/ split in {data_dir}",
                                     hint="run `autoresearch prepare` first")
        self.backend = backend
        self.image = image
        self.trainer_dir = trainer_dir.resolve()
        self.data_dir = data_dir.resolve()
        self.work_dir = work_dir.resolve()
        self.instance = instance
        self.train_limits = train_limits
        self.eval_limits = eval_limits
        self.train_env = {k: v for k, v in env.items() if k in TRAIN_ENV_KEYS}
        self.eval_env = {k: v for k, v in env.items() if k in EVAL_ENV_KEYS}
        self.gpu_probe = gpu_probe
        # The daemon passes a StoredReplayGuard (earlier seeds survive restarts); without one, memory is in process.
        self.replays: Replays = replays if replays is not None else ReplayGuard()
        self.gpu_release_timeout_s = gpu_release_timeout_s
        # A GPU lane's stages refuse to run without CUDA (trainer.device_check): never a silent CPU run. Only tests
        # that script a GPU on a CPU machine turn this off.
        self.require_cuda = require_cuda
        # The torch.compile cache: read-only in every train stage. Only a run of the shipped baseline (the
        # trusted trainer_dir/train.py, byte for byte) fills it; an agent's code, even a kept one, never does.
        self.compile_cache = compile_cache.resolve() if compile_cache is not None else None
        if self.compile_cache is not None:
            self.compile_cache.mkdir(parents=True, exist_ok=True)
        shipped = self.trainer_dir / "train.py"
        self.cache_writer_source = shipped.read_text() if shipped.is_file() else None

    def _name(self, experiment_id: int, attempt: int, stage: str) -> str:
        safe_instance = re.sub(r"[^a-zA-Z0-9_.-]", "-", self.instance)
        return f"autoresearch-{safe_instance}-{experiment_id}-{attempt}-{stage}"

    def _spec(self, experiment_id: int, attempt: int, stage: str, command: tuple[str, ...],
              mounts: tuple[Mount, ...], env: dict[str, str], limits: Limits, gpu_uuid: str | None,
              split_identities: bool = False) -> RunSpec:
        return RunSpec(
            name=self._name(experiment_id, attempt, stage),
            command=command,
            image=self.image,
            mounts=(Mount(self.trainer_dir, TRAINER_TARGET), *mounts),
            env={"PYTHONPATH": "/opt/autoresearch", **env},
            limits=limits,
            gpu_uuid=gpu_uuid,
            labels=labels.run_labels(self.instance, experiment_id, stage, attempt),
            split_identities=split_identities,
            # A split stage starts as root, which may not enter the private folder: it starts at / (the train
            # harness runs the candidate in its out dir itself).
            workdir="/" if split_identities else "/out",
        )

    def _cache_mounts(self) -> tuple[Mount, ...]:
        return () if self.compile_cache is None else (Mount(self.compile_cache, CACHE_TARGET),)

    def _cache_env(self, publish: bool) -> dict[str, str]:
        if self.compile_cache is None:
            return {}
        return {CACHE_ENV: CACHE_TARGET, **({PUBLISH_ENV: "1"} if publish else {})}

    def _released(self, result: RunResult, gpu_uuid: str | None) -> bool:
        """After a killed GPU run, whether its memory came back (False: quarantine the GPU)."""
        if gpu_uuid is None or self.gpu_probe is None or result.status not in _KILLED:
            return True
        return wait_for_gpu_release(self.gpu_probe, gpu_uuid, timeout_s=self.gpu_release_timeout_s)

    def _remove(self, folder: Path) -> None:
        """Remove a run folder whatever the sandbox left in it; the backend purges what this user cannot."""
        if not remove_tree(folder) and hasattr(self.backend, "purge"):
            with contextlib.suppress(Exception):  # a purge that fails leaves a folder, never a failed run
                self.backend.purge(folder, self.image)
            remove_tree(folder)

    def _over_quota(self, train: RunResult, train_out: Path) -> str | None:
        """Why the train stage's out dir is over its total quota (the harness kills at the quota and exits 6;
        the size is also measured here, from outside)."""
        quota = _finite_setting(self.train_env.get("AUTORESEARCH_OUT_QUOTA")) or OUT_QUOTA_BYTES
        if train.status is RunStatus.FAILED and train.exit_code == EXIT_OUT_QUOTA:
            return "train stage out dir over its total quota: the harness stopped the candidate"
        size = out_dir_size(train_out)  # a bounded walk: no shape of out dir can make it raise
        if size.problem:
            return f"train stage {size.problem}, over what the daemon walks"
        if size.bytes > quota + OUT_QUOTA_SLACK_BYTES:
            return f"train stage out dir holds {size.bytes} bytes, over its total quota of {quota:.0f} bytes"
        return None

    def _over_budget(self, train: RunResult, train_json: dict[str, Any]) -> str | None:
        """Why a train stage that ran to its end is over budget (None: it is not). The harness's exit status
        says so from inside the container; the container's wall time, measured here, bounds it from outside
        whatever the container wrote."""
        if train.status is RunStatus.FAILED and train.exit_code == EXIT_OVER_BUDGET:
            detail = train_json.get("over_budget")
            return f"train stage over budget: {detail if isinstance(detail, str) and detail else 'harness exit 5'}"
        if train.status not in (RunStatus.OK, RunStatus.FAILED):
            return None
        budget = _finite_setting(self.train_env.get("AUTORESEARCH_TIME_BUDGET"))
        if budget is None:
            return None
        compile_budget = _finite_setting(self.train_env.get("AUTORESEARCH_COMPILE_BUDGET"))
        limit = budget + (compile_budget if compile_budget is not None else DEFAULT_COMPILE_BUDGET) \
            + max(SLACK_MIN_SECONDS, SLACK_FRACTION * budget) + CONTAINER_GRACE_SECONDS
        if train.wall_seconds > limit:
            return (f"train stage over budget: the container ran {train.wall_seconds:.1f} s by the daemon's clock, "
                    f"over the {limit:.1f} s that compile budget, budget, slack and the harness's own work allow")
        return None

    def _train_limits(self) -> Limits:
        """The train stage's limits: the candidate writes a work tmpfs sized from the checkpoint's cap (the
        per-file limit) and the out quota, whichever is smaller; the kernel enforces it."""
        quota = _finite_setting(self.train_env.get("AUTORESEARCH_OUT_QUOTA")) or OUT_QUOTA_BYTES
        work = min(int(quota), self.train_limits.out_file_max_bytes + WORK_HEADROOM_BYTES)
        return replace(self.train_limits, work_bytes=work)

    def run(self, experiment_id: int, attempt: int, source: str, seed: int, gpu_uuid: str | None = None,
            cancel: Cancel | None = None, on_stage: Callable[[str], None] | None = None) -> StageOutcome:
        run_dir = self.work_dir / f"{experiment_id}-{attempt}"
        # A retry after a crash starts from a clean folder: half-written outputs must not leak in.
        self._remove(run_dir)
        candidate_dir = run_dir / "candidate"
        candidate_dir.mkdir(parents=True)
        (candidate_dir / "train.py").write_text(source)
        candidate_dir.chmod(0o755)
        (candidate_dir / "train.py").chmod(0o644)
        train_out, eval_out = run_dir / "train_out", run_dir / "eval_out"
        cuda_env = {REQUIRE_ENV: "1"} if gpu_uuid is not None and self.require_cuda else {}
        publish_cache = self.compile_cache is not None and source == self.cache_writer_source

        if on_stage is not None:
            on_stage("train")
        train = self.backend.run(self._spec(
            experiment_id, attempt, "train", TRAIN_COMMAND,
            (Mount(candidate_dir, "/candidate"), Mount(self.data_dir / "train", "/data"), Mount(train_out, "/out", True),
             *self._cache_mounts()),
            {**self.train_env, "AUTORESEARCH_SEED": str(seed), **self._cache_env(publish_cache), **cuda_env},
            self._train_limits(), gpu_uuid,
            split_identities=True,  # the candidate runs as its own uid, out of the harness's reach (trainer.privsep)
        ), cancel)
        if publish_cache and self.compile_cache is not None and train.status == RunStatus.OK:
            with contextlib.suppress(OSError):  # the cache only saves time: the next run compiles cold
                harvest(train_out / PUBLISHED_DIR, self.compile_cache)
        train_json = _json_file(train, "train.json") or {}
        summary = clean_summary(train_json.get("summary"))
        inner_train = _finite(train_json.get("wall_seconds"))
        overhead = {"train": max(0.0, train.wall_seconds - inner_train)} if inner_train is not None else {}

        def finish(status: str, error: str, *, eval_result: RunResult | None = None, val_bpb: float | None = None,
                   probe: str = "", eval_seconds: float = 0.0) -> StageOutcome:
            last = eval_result if eval_result is not None else train
            quarantined = not self._released(last, gpu_uuid)
            # Everything needed was read into the results: drop what the candidate wrote (checkpoints are
            # large, and a hostile candidate may have filled its out dir), keep the small candidate/ folder.
            for out_dir in (train_out, eval_out):
                self._remove(out_dir)
            tail = train.output_tail if eval_result is None or eval_result.ok else (
                f"{train.output_tail}\n--- eval ---\n{eval_result.output_tail}")
            # Everything that came out of the sandbox is cleaned and bounded here (sandbox.sanitize): the store,
            # git, prompts, the status page and terminals get printable text and numbers they can hold.
            return StageOutcome(status=status, val_bpb=val_bpb, summary=summary, train=train, eval=eval_result,
                                probe=clean_line(probe, 500), error=clean_text(error, 4000),
                                log_tail=clean_text(tail, keep_end=True), eval_seconds=eval_seconds,
                                overhead_seconds=overhead, gpu_quarantined=quarantined)

        if (refused := _harness_refusal("train", train, train_out / "train.json")) is not None:
            return finish("infra_error", refused)
        if (over := self._over_budget(train, train_json)) is not None:
            return finish("timeout", over)
        if (quota := self._over_quota(train, train_out)) is not None:
            return finish("crashed", quota)
        if not train.ok:
            reason = _stage_failure("train", train)
            return finish(_TRAIN_STATUS[train.status], reason)
        if not is_safe_regular_file(train_out / CHECKPOINT_NAME):
            return finish("crashed", f"train stage left no regular {CHECKPOINT_NAME} checkpoint")

        if on_stage is not None:
            on_stage("eval")
        evaluation = self.backend.run(self._spec(
            experiment_id, attempt, "eval", EVAL_COMMAND,
            (Mount(self.data_dir / "val", EVAL_DATA), Mount(train_out, "/checkpoint"), Mount(eval_out, EVAL_OUT, True)),
            {**self.eval_env, **cuda_env}, self.eval_limits, gpu_uuid, split_identities=True,
        ), cancel)
        result = _json_file(evaluation, "result.json")
        eval_seconds = evaluation.wall_seconds
        inner_eval = _finite((result or {}).get("eval_seconds"))
        if inner_eval is not None:
            overhead["eval"] = max(0.0, evaluation.wall_seconds - inner_eval)
        if (refused := _harness_refusal("eval", evaluation, eval_out / "result.json")) is not None:
            return finish("infra_error", refused, eval_result=evaluation, eval_seconds=eval_seconds)
        if not evaluation.ok or result is None:
            status = _TRAIN_STATUS.get(evaluation.status, "crashed")
            why = _stage_failure("eval", evaluation)
            if evaluation.ok:
                why = "eval stage wrote no readable result.json"
            return finish(status, why, eval_result=evaluation, eval_seconds=eval_seconds)
        probe = clean_line(result.get("probe", ""), 500)
        val_bpb = _finite(result.get("val_bpb"))
        if val_bpb is not None and not 0.0 <= val_bpb < 1e6:
            val_bpb = None
        if result.get("status") != "ok" or val_bpb is None or probe != "passed":
            why = str(result.get("error") or "") or f"eval judged the checkpoint invalid (probe: {probe or 'missing'})"
            return finish("invalid", why, eval_result=evaluation, probe=probe, eval_seconds=eval_seconds)
        replay = self.replays.check(source, seed, str(result.get("checkpoint_sha256", "")), val_bpb,
                                    experiment_id=experiment_id)
        if replay:
            return finish("invalid", replay, eval_result=evaluation, probe=probe, eval_seconds=eval_seconds)
        return finish("ok", "", eval_result=evaluation, val_bpb=val_bpb, probe=probe, eval_seconds=eval_seconds)
