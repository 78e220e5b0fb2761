"""The cluster backend: each stage is one Slurm job that runs the hardened container on its node.

A stage's files live in `<shared_dir>/jobs/<run name>/` (batch script, `meta.json`, the script's status file
and output tail); the run's mounts (candidate, data, trainer, out dir) must be on paths every node sees at
the same place. Jobs are submitted `--no-requeue`: a preempted job ends PREEMPTED and the daemon requeues
the *experiment* (a new attempt, a new job), so Slurm never runs a stage twice behind the daemon's back.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sandbox import labels as L
from sandbox import treewalk
from sandbox.base import ReapedRun
from sandbox.errors import BackendUnavailable
from sandbox.outfiles import prepare_out_dir, read_out_files
from sandbox.slurm.commands import SlurmClient, SlurmCommandError
from sandbox.slurm.script import OUTPUT_FILE, STATUS_FILE, batch_script
from sandbox.slurm.states import JobInfo, StageStatus, parse_status, stage_outcome
from sandbox.spec import Cancel, RunResult, RunSpec, RunStatus
from sandbox.tail import sanitize_tail

META_FILE = "meta.json"
SLURM_OUT = "slurm.out"
# How long a cancelled job may take to reach a final state (Slurm's KillWait plus the container's kill).
CANCEL_WAIT_S = 90.0
# How long a finished job's status file may take to appear here (NFS attribute caching on the shared dir).
STATUS_GRACE_S = 15.0
# Polls in a row that find no trace of a submitted job before the run is reported lost.
LOST_AFTER_POLLS = 10
_COMMENT_SAFE = re.compile(r"[^A-Za-z0-9_.:=-]")


@dataclass(frozen=True)
class SlurmOptions:
    """Where and how stages are submitted (built from the daemon's `[slurm]` settings)."""

    shared_dir: Path
    partition: str = ""
    qos: str = ""
    account: str = ""
    gres: str = ""  # e.g. "gpu:1"; empty = CPU-only jobs
    node_paths: tuple[Path, ...] = ()  # further directories every node sees at the same path
    time_slack_s: float = 120.0  # container start and tear-down on top of the stage's own limit
    poll_s: float = 2.0
    extra_args: tuple[str, ...] = ()
    slurm_conf: Path | None = None
    jobcomp_log: Path | None = None
    command_timeout_s: float = 30.0
    labels_in_comment: bool = True


def job_comment(labels: dict[str, str]) -> str:
    """The run's labels as one `--comment` value: `key=value` pairs joined by commas, shell-safe."""
    return ",".join(f"{_COMMENT_SAFE.sub('-', k)}={_COMMENT_SAFE.sub('-', v)}" for k, v in sorted(labels.items()))


def parse_comment(comment: str) -> dict[str, str]:
    pairs = (item.partition("=") for item in comment.split(","))
    return {key: value for key, sep, value in pairs if sep}


def time_limit_minutes(timeout_s: float, slack_s: float) -> int:
    """Slurm's `--time` in whole minutes: the stage's limit plus the container's start/stop slack, rounded up."""
    return max(1, math.ceil((timeout_s + slack_s) / 60.0))


class SlurmBackend:
    """Runs each `RunSpec` as one Slurm job (see the module docstring)."""

    name = "slurm"

    def __init__(self, instance: str, options: SlurmOptions, client: SlurmClient | None = None) -> None:
        self.instance = instance
        self.options = options
        self.client = client if client is not None else SlurmClient(options.slurm_conf, options.jobcomp_log,
                                                                     options.command_timeout_s)
        self.jobs_dir = options.shared_dir / "jobs"
        # Told `(spec, job_id)` as soon as sbatch answers (the daemon stores the job id with the run).
        self.on_submitted: Callable[[RunSpec, str], None] | None = None

    # --- submission ----------------------------------------------------------------------------------

    def sbatch_options(self, spec: RunSpec, job_dir: Path) -> list[str]:
        """Everything `sbatch` is told besides the script (public for the GRES unit test)."""
        o, limits = self.options, spec.limits
        argv = [
            f"--job-name={spec.name}",
            f"--time={time_limit_minutes(limits.timeout_s, o.time_slack_s)}",
            "--no-requeue",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={max(1, math.ceil(limits.cpus))}",
            # The container's limit is memory plus the train stage's work tmpfs (charged to the same cgroup).
            f"--mem={math.ceil((limits.memory_bytes + limits.work_bytes) / 1024**2)}M",
            f"--output={job_dir / SLURM_OUT}",
            f"--chdir={job_dir}",
        ]
        if o.labels_in_comment:
            argv.append(f"--comment={job_comment({**spec.labels, L.INSTANCE: self.instance})}")
        argv += [f"--partition={o.partition}"] if o.partition else []
        argv += [f"--qos={o.qos}"] if o.qos else []
        argv += [f"--account={o.account}"] if o.account else []
        argv += [f"--gres={o.gres}"] if o.gres else []
        return [*argv, *o.extra_args]

    def _unshared(self, spec: RunSpec) -> list[str]:
        roots = [self.options.shared_dir.resolve(), *(p.resolve() for p in self.options.node_paths)]
        return [str(m.source) for m in spec.mounts
                if not any(m.source.resolve().is_relative_to(root) for root in roots)]

    def require_shared(self, paths: list[Path]) -> None:
        """Refuse (before any run) folders the compute nodes would not see at the same path."""
        roots = [self.options.shared_dir.resolve(), *(p.resolve() for p in self.options.node_paths)]
        outside = [str(p) for p in paths if not any(p.resolve().is_relative_to(root) for root in roots)]
        if outside:
            raise BackendUnavailable(
                f"{', '.join(outside)} not under the Slurm shared directory {self.options.shared_dir} or "
                f"[slurm] node_paths: compute nodes would not see them (put the workspace and data on the "
                "shared filesystem, or list their shared mount in node_paths)")

    def _write_job(self, spec: RunSpec, job_dir: Path) -> Path:
        treewalk.remove_tree(job_dir)  # a retry after a crash: the reaper already had its turn
        job_dir.mkdir(parents=True, mode=0o700)
        script = job_dir / "job.sh"
        script.write_text(batch_script(spec, self.instance, job_dir, gpu=bool(self.options.gres)))
        script.chmod(0o700)
        self._write_meta(job_dir, spec, job_id="")
        return script

    def _write_meta(self, job_dir: Path, spec: RunSpec, job_id: str) -> None:
        meta = {"job_id": job_id, "name": spec.name, "instance": self.instance,
                "labels": {**spec.labels, L.INSTANCE: self.instance}, "out_dir": str(spec.out_mount().source),
                "tail_bytes": spec.limits.output_tail_bytes, "timeout_s": spec.limits.timeout_s}
        tmp = job_dir / f"{META_FILE}.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(job_dir / META_FILE)

    def check(self, image: str = "") -> str:
        """Before any run: the clients answer and the cluster accepts our submission (partition, account, QoS).

        Raises `BackendUnavailable` with the cluster's own words; returns a one-line description.
        """
        missing = self.client.missing()
        if missing:
            raise BackendUnavailable(f"Slurm commands missing: {', '.join(missing)} (install slurm-client)")
        self.client.ping()
        partition = self.options.partition or self.client.default_partition()
        info = self.client.partition(partition)
        if info.get("State", "UP") != "UP":
            raise BackendUnavailable(f"partition {partition!r} is {info.get('State')}, not UP")
        if not self.options.shared_dir.is_dir():
            raise BackendUnavailable(f"Slurm shared directory {self.options.shared_dir} does not exist")
        probe_dir = self.jobs_dir / f".check-{self.instance}"
        probe_dir.mkdir(parents=True, exist_ok=True)
        try:
            script = probe_dir / "probe.sh"
            script.write_text("#!/bin/sh\ntrue\n")
            options = [f"--partition={partition}", "--time=1", "--nodes=1", f"--chdir={probe_dir}"]
            options += [f"--qos={self.options.qos}"] if self.options.qos else []
            options += [f"--account={self.options.account}"] if self.options.account else []
            options += [f"--gres={self.options.gres}"] if self.options.gres else []
            self.client.test_submit([*options, *self.options.extra_args], script)
        finally:
            treewalk.remove_tree(probe_dir)
        return (f"partition {partition} ({info.get('State', '?')}, PriorityTier {info.get('PriorityTier', '?')}, "
                f"PreemptMode {info.get('PreemptMode', '?')})")

    # --- running -----------------------------------------------------------------------------------

    def run(self, spec: RunSpec, cancel: Cancel | None = None) -> RunResult:
        began = time.monotonic()
        unshared = self._unshared(spec)
        if unshared:
            return RunResult(RunStatus.INFRA_ERROR, None, 0.0,
                             error=f"mounts outside the Slurm shared directory: {', '.join(unshared)}")
        out_dir = spec.out_mount().source
        prepare_out_dir(out_dir, *spec.out_owner())
        job_dir = self.jobs_dir / spec.name
        try:
            script = self._write_job(spec, job_dir)
            job_id = self.client.submit(self.sbatch_options(spec, job_dir), script)
            self._write_meta(job_dir, spec, job_id)
        except (SlurmCommandError, OSError) as exc:
            treewalk.remove_tree(job_dir)
            return RunResult(RunStatus.INFRA_ERROR, None, time.monotonic() - began, error=f"sbatch failed: {exc}")
        notes = []
        if self.on_submitted is not None:
            try:
                self.on_submitted(spec, job_id)
            except Exception as exc:  # the job runs regardless: failing here would orphan it
                notes.append(f"job id not recorded ({type(exc).__name__}: {exc})")
        try:
            killed_as, info, running_s = self._wait(job_id, spec, job_dir, cancel)
            result = self._collect(spec, job_dir, info, killed_as, running_s, job_id)
            if notes:
                result = replace(result, error="; ".join([*notes, result.error]).strip("; "))
            return result
        finally:
            treewalk.remove_tree(job_dir)

    def _wait(self, job_id: str, spec: RunSpec, job_dir: Path,
              cancel: Cancel | None) -> tuple[RunStatus | None, JobInfo | None, float]:
        """Poll until the job ends; cancel it on a Cancel, a requeue or the daemon's own deadline."""
        limit = spec.limits.timeout_s + self.options.time_slack_s
        started: float | None = None
        misses = 0
        while True:
            if cancel is not None and cancel.reason is not None:
                return cancel.reason, self._cancel_and_wait(job_id), _since(started)
            try:
                info = self.client.job(job_id)
            except SlurmCommandError:
                info = None  # a controller hiccup: keep polling, the job runs on regardless
            if info is None:
                misses += 1
                if (job_dir / STATUS_FILE).exists() or misses >= LOST_AFTER_POLLS:
                    return None, None, _since(started)
            else:
                misses = 0
                if info.state == "RUNNING" and started is None:
                    started = time.monotonic()
                if info.requeued:
                    # Slurm would run it again behind our back: end it here; the daemon requeues the experiment.
                    self._cancel_and_wait(job_id)
                    return RunStatus.PREEMPTED, info, _since(started)
                if info.final:
                    return None, info, _since(started)
            if started is not None and time.monotonic() - started > limit:
                return RunStatus.TIMEOUT, self._cancel_and_wait(job_id), _since(started)
            time.sleep(self.options.poll_s)

    def _cancel_and_wait(self, job_id: str) -> JobInfo | None:
        with contextlib.suppress(SlurmCommandError):
            self.client.cancel(job_id)
        deadline = time.monotonic() + CANCEL_WAIT_S
        info: JobInfo | None = None
        while time.monotonic() < deadline:
            with contextlib.suppress(SlurmCommandError):
                info = self.client.job(job_id)
            if info is None or info.final:
                return info
            time.sleep(min(self.options.poll_s, 1.0))
        return info

    def _collect(self, spec: RunSpec, job_dir: Path, info: JobInfo | None, killed_as: RunStatus | None,
                 running_s: float, job_id: str) -> RunResult:
        status = _read_status(job_dir)
        deadline = time.monotonic() + STATUS_GRACE_S
        while status is None and killed_as is None and info is not None and info.state in ("COMPLETED", "FAILED") \
                and time.monotonic() < deadline:
            time.sleep(min(self.options.poll_s, 1.0))  # a shared filesystem may show the node's file late
            status = _read_status(job_dir)
        if killed_as is not None:
            outcome, note = killed_as, ""
        else:
            outcome, note = stage_outcome(info, status)
            if info is None and status is None:
                note = f"Slurm lost track of job {job_id} and it left no status (purged before we saw it end?)"
        out = read_out_files(spec.out_mount().source)
        wall = status.wall_seconds if status is not None and status.wall_seconds is not None else running_s
        tail = _read_tail(job_dir)
        errors = [e for e in (note, out.describe_refused()) if e]
        return RunResult(
            status=outcome,
            exit_code=status.exit_code if status is not None else None,
            wall_seconds=wall,
            output_tail=sanitize_tail(tail, spec.limits.output_tail_bytes),
            files=out.files,
            oom_killed=bool(status is not None and status.oom),
            error=f"slurm job {job_id}: " + "; ".join(errors) if errors else "",
        )

    # --- reconciliation ------------------------------------------------------------------------------

    def reap(self, owner_alive: Callable[[str], bool]) -> list[ReapedRun]:
        """Collect stages that finished while their daemon was gone, cancel orphans (interrupted), drop the rest."""
        from sandbox.slurm.reaper import reap_jobs

        return reap_jobs(self, owner_alive)

    def active_pids(self) -> set[int]:
        """None here: a stage's processes run on a compute node, never on the daemon's own machine."""
        return set()

    def close(self) -> None:
        """Nothing to release (each command is its own process)."""


def _since(started: float | None) -> float:
    return 0.0 if started is None else time.monotonic() - started


def _read_status(job_dir: Path) -> StageStatus | None:
    try:
        return parse_status((job_dir / STATUS_FILE).read_text(errors="replace"))
    except OSError:
        return None


def _read_tail(job_dir: Path, cap: int = 256 * 1024) -> bytes:
    """The container's output tail, else the batch script's own output (why it could not start)."""
    for name in (OUTPUT_FILE, SLURM_OUT):
        with contextlib.suppress(OSError):
            with open(job_dir / name, "rb") as handle:
                handle.seek(0, 2)
                size = handle.tell()
                handle.seek(max(0, size - cap))
                data = handle.read()
            if data.strip():
                return data
    return b""
