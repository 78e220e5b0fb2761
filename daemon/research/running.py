"""Running one claimed experiment on a lane: the sandbox run, its outcome, and what follows.

`Execution` belongs to one `ResearchSession`: it runs the experiment through the runner (train + eval
stages) with the lane's cancel handle, records the outcome (measured ones go to the keeper, which judges
them), counts sandbox failures and crashes in a row, gives the agent one fix attempt after a crash, and
pushes an experiment back (interrupted + a queued copy) when something of ours failed under it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from daemon.agents import CrashInfo
from daemon.errors import (
    TransitionError,
)
from daemon.ops.logs import bind_experiment, get_logger
from daemon.research.lanes import Lane
from daemon.research.stop import StopCondition
from daemon.store.records import ExperimentRecord
from sandbox.spec import Cancel, RunStatus

if TYPE_CHECKING:
    from daemon.research.session import ResearchSession

log = get_logger("autoresearch.research")

ACTIVE = ("running", "evaluating")
CRASH_STATUSES = ("crashed", "timeout", "oom", "invalid")
MAX_ATTEMPTS = 3  # an experiment pushed back this often (sandbox or DB trouble) is not retried again
_SUMMARY_FIELDS = {
    "training_seconds": "training_seconds", "total_seconds": "total_seconds", "peak_vram_mb": "peak_vram_mb",
    "mfu_percent": "mfu_percent", "total_tokens_M": "total_tokens_m", "num_params_M": "num_params_m",
}
_SUMMARY_INT_FIELDS = {"num_steps": "num_steps", "depth": "depth"}


@dataclass
class Running:
    """A lane's experiment in flight: its cancel handle and start time."""

    lane: Lane
    cancel: Cancel
    started: float


def outcome_fields(outcome: Any) -> dict[str, Any]:
    """Store fields of a runner outcome (metrics only from the eval stage; the summary is informational)."""
    fields: dict[str, Any] = {}
    summary = getattr(outcome, "summary", None) or {}
    for key, column in _SUMMARY_FIELDS.items():
        if isinstance(summary.get(key), int | float):
            fields[column] = float(summary[key])
    for key, column in _SUMMARY_INT_FIELDS.items():
        if isinstance(summary.get(key), int | float):
            fields[column] = int(summary[key])
    if outcome.val_bpb is not None:
        fields["val_bpb"] = float(outcome.val_bpb)
    if getattr(outcome, "eval_seconds", None) is not None:
        fields["eval_seconds"] = float(outcome.eval_seconds)
    if getattr(outcome, "probe", None):
        fields["probe"] = str(outcome.probe)
    train = getattr(outcome, "train", None)
    if train is not None:
        fields["exit_code"] = train.exit_code
        fields["oom"] = bool(train.oom_killed)
    fields["log_tail"] = str(getattr(outcome, "log_tail", "") or "")[-8000:]
    if getattr(outcome, "error", ""):
        fields["error"] = str(outcome.error)[:2000]
    return fields


def baseline_failure(experiment_id: int, status: str, error: str, log_tail: str) -> str:
    last_lines = " | ".join(line.strip() for line in log_tail.strip().splitlines()[-2:])
    return f"the baseline train.py {status} (experiment {experiment_id}): {error.strip()[:200]}: {last_lines[-300:]}"


class Execution:
    """Runs the experiments of one session (see the module docstring)."""

    def __init__(self, session: ResearchSession) -> None:
        self.session = session

    def execute(self, lane: Lane, experiment: ExperimentRecord, stop: StopCondition) -> None:
        with self.session._lock:
            running = self.session._running[experiment.id]
        if stop.kill_due():
            running.cancel.set(RunStatus.INTERRUPTED)
        if self.session.gate is not None and lane.gpu_uuid is not None:
            self.session.gate.attach_run(lane.gpu_uuid, running.cancel)
        if self.session.metrics is not None:
            self.session.metrics.lane_busy(lane.name, True)
        self.session._show_lane(lane, "running", experiment)
        with bind_experiment(experiment.id, lane=lane.name, kind=experiment.kind):
            log.info("experiment started", attempt=experiment.attempt, seed=experiment.seed,
                     description=experiment.description[:120])
            try:
                outcome = self.session.runner.run(
                    experiment.id, experiment.attempt, experiment.source, experiment.seed,
                    gpu_uuid=lane.gpu_uuid, cancel=running.cancel,
                    on_stage=lambda stage: self.on_stage(lane, experiment, stage))
                self.finish(lane, experiment, outcome, running)
            except TransitionError as exc:
                if not self.session._lease_lost(experiment.id):
                    self.push_back(experiment, f"{type(exc).__name__}: {exc}")
                    raise
                # Our lease expired and another daemon took the experiment over: its run stands, ours is dropped.
                log.warning("lease lost; leaving the experiment to its new owner", error=str(exc)[:300])
                with self.session._lock:
                    self.session._awaiting.pop(experiment.id, None)
            except BaseException as exc:
                self.push_back(experiment, f"{type(exc).__name__}: {exc}")
                raise
            finally:
                if self.session.gate is not None and lane.gpu_uuid is not None:
                    self.session.gate.detach_run(lane.gpu_uuid)
                if self.session.metrics is not None:
                    self.session.metrics.lane_busy(lane.name, False)
                self.session._show_lane(lane, "idle")
                with self.session._lock:
                    self.session._running.pop(experiment.id, None)

    def on_stage(self, lane: Lane, experiment: ExperimentRecord, stage: str) -> None:
        if stage == "eval":
            self.session._transition(experiment.id, "running", "evaluating")
            self.session._show_lane(lane, "evaluating", experiment)

    def finish(self, lane: Lane, experiment: ExperimentRecord, outcome: Any, running: Running) -> None:
        fields = outcome_fields(outcome)
        status = str(getattr(outcome.status, "value", outcome.status))
        if self.session.metrics is not None:
            self.observe_stages(outcome)
            if lane.gpu_uuid is not None:
                # The runner checks after each killed run whether the GPU's memory came back.
                self.session.metrics.gpu_quarantined(lane.gpu_uuid, bool(getattr(outcome, "gpu_quarantined", False)))
        if lane.gpu_uuid is not None and getattr(outcome, "gpu_quarantined", False):
            self.session._quarantined.add(lane.gpu_uuid)
            log.error("GPU quarantined: no more experiments on it this session", lane=lane.name, gpu=lane.gpu_uuid)
        self.count_infra_error(status, str(fields.get("error") or f"sandbox run {status}"))
        if status == "ok" and outcome.val_bpb is not None:
            self.ensure_evaluating(experiment.id)
            final = self.session._judge(experiment, float(outcome.val_bpb), fields)
            self.session._crash_streak = 0
        elif status in ("interrupted", "preempted", "infra_error"):
            final = "preempted" if status == "preempted" else "interrupted"
            fields.setdefault("error", f"sandbox run {status}")
            self.session._transition(experiment.id, ACTIVE, final, **fields)
            killed_by_stop = status == "interrupted" and running.cancel.reason is RunStatus.INTERRUPTED
            if killed_by_stop:
                # The session is ending: the next session redoes it (see `_find_leftovers`).
                self.session._keeper.interrupt(experiment.parent_id, "its confirmation run was cut short by a stop")
            else:
                self.retry_copy(experiment, f"sandbox run {status}")
            self.session._keeper.abandon(experiment, f"its confirmation run was {final}")
        else:
            final = status if status in CRASH_STATUSES else "invalid"
            self.session._transition(experiment.id, ACTIVE, final, **fields)
            self.after_crash(lane, experiment, final, fields)
        with bind_experiment(experiment.id, lane=lane.name, kind=experiment.kind):
            log.info("experiment finished", status=final, val_bpb=fields.get("val_bpb"),
                     seconds=round(time.monotonic() - running.started, 1))
        self.session.workspace.write_results(self.session.store.results_tsv(self.session.session_id))
        if self.session.metrics is not None:
            self.session.metrics.experiment_finished(experiment.kind, final, lane.name, fields.get("val_bpb"),
                                             time.monotonic() - running.started)
            self.session.metrics.consecutive_crashes(self.session._crash_streak)

    def count_infra_error(self, status: str, error: str) -> None:
        """A sandbox that keeps failing is a broken set-up: stop the session instead of retrying forever."""
        if status != "infra_error":
            self.session._infra_streak = 0
            return
        self.session._infra_streak += 1
        if self.session._infra_streak >= MAX_ATTEMPTS:
            self.session._fatal = (f"the sandbox failed {self.session._infra_streak} runs in a row: {error[:300]} "
                           "(check `autoresearch doctor` and the [sandbox] settings)")

    def observe_stages(self, outcome: Any) -> None:
        overhead = getattr(outcome, "overhead_seconds", None) or {}
        for stage, result in (("train", outcome.train), ("eval", outcome.eval)):
            if result is not None:
                self.session.metrics.stage_finished(stage, result.wall_seconds, float(overhead.get(stage, 0.0)))

    def ensure_evaluating(self, experiment_id: int) -> None:
        current = self.session.store.get_experiment(experiment_id)
        if current is not None and current.status == "running":
            self.session._transition(experiment_id, "running", "evaluating")

    def after_crash(self, lane: Lane, experiment: ExperimentRecord, status: str, fields: dict[str, Any]) -> None:
        if experiment.kind == "baseline":
            self.session._fatal = baseline_failure(experiment.id, status, str(fields.get("error", "")),
                                            str(fields.get("log_tail", "")))
            return
        if experiment.kind in ("noise", "remeasure"):
            return
        if experiment.kind == "confirm":
            self.session._keeper.abandon(experiment, f"its confirmation run {status}")
            return
        self.session._crash_streak += 1
        limit = self.session.settings.judge.max_consecutive_crashes
        if self.session._crash_streak >= limit:
            log.error("too many consecutive crashes; stopping the session", crashes=self.session._crash_streak)
            self.session._fatal = f"{self.session._crash_streak} experiments crashed in a row (judge.max_consecutive_crashes)"
            return
        if experiment.kind == "candidate" and experiment.id not in self.session._fix_attempts:
            # One fix attempt: the agent sees the failure (fenced, truncated) and may repair the idea.
            self.session._work.proposer(lane).prefetch(CrashInfo(experiment.id, experiment.description, status,
                                                    str(fields.get("log_tail", ""))[-4000:], experiment.diff))

    def push_back(self, experiment: ExperimentRecord, why: str) -> None:
        """Before an error propagates: mark the experiment interrupted and queue it again."""
        try:
            current = self.session.store.get_experiment(experiment.id)
            if current is not None and current.status in ACTIVE:
                self.session._transition(experiment.id, ACTIVE, "interrupted", error=why[:2000])
                self.retry_copy(experiment, why)
        except Exception as exc:  # the store may be the reason; lease expiry requeues it on the next start
            log.error("could not push the experiment back", experiment_id=experiment.id, error=str(exc)[:300])

    def retry_copy(self, experiment: ExperimentRecord, why: str) -> ExperimentRecord | None:
        if experiment.kind == "confirm" or experiment.attempt >= MAX_ATTEMPTS:
            return None
        copy: ExperimentRecord = self.session.store.create_experiment(
            experiment.session_id, experiment.kind, experiment.source, parent_id=experiment.parent_id,
            description=experiment.description, hypothesis=experiment.hypothesis, diff=experiment.diff,
            seed=experiment.seed, attempt=experiment.attempt + 1, source_hash=experiment.source_hash)
        log.info("experiment queued again", experiment_id=experiment.id, retry_id=copy.id, why=why[:200])
        return copy
