"""Running one claimed experiment on a lane: the sandbox run, its outcome, and what follows.

`Execution` belongs to one `ResearchSession`: it runs the experiment through the runner (train + eval
stages) with the lane's cancel handle, records the outcome (measured ones go to the keeper, which judges
them), counts sandbox failures and crashes in a row (in the session's `state.SessionState`), gives the
agent one fix attempt after a crash, and pushes an experiment back (interrupted + a queued copy) when
something of ours failed under it. Rows change through the session's `board.ExperimentBoard`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from daemon.agents import CrashInfo
from daemon.config import Settings
from daemon.errors import (
    TransitionError,
)
from daemon.ops.logs import bind_experiment, get_logger
from daemon.research.board import ExperimentBoard
from daemon.research.keeper import Keeper
from daemon.research.lanes import Lane, LaunchGate
from daemon.research.proposer import Proposer
from daemon.research.state import Running, SessionState
from daemon.research.stop import StopCondition
from daemon.research.workspace import Workspace
from daemon.store.records import ExperimentRecord
from sandbox.spec import Cancel, RunStatus

log = get_logger("autoresearch.research")

ACTIVE = ("running", "evaluating")
CRASH_STATUSES = ("crashed", "timeout", "oom", "invalid")
MAX_ATTEMPTS = 3  # an experiment pushed back this often (sandbox or DB trouble) is not retried again
_SUMMARY_FIELDS = {
    "training_seconds": "training_seconds", "total_seconds": "total_seconds", "peak_vram_mb": "peak_vram_mb",
    "mfu_percent": "mfu_percent", "total_tokens_M": "total_tokens_m", "num_params_M": "num_params_m",
}
_SUMMARY_INT_FIELDS = {"num_steps": "num_steps", "depth": "depth"}


class Runner(Protocol):
    """`daemon.research.runner.StageRunner`: train + eval of one experiment in the sandbox."""

    def run(self, experiment_id: int, attempt: int, source: str, seed: int, gpu_uuid: str | None = None,
            cancel: Cancel | None = None, on_stage: Callable[[str], None] | None = None) -> Any: ...


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

    def __init__(self, *, settings: Settings, store: Any, workspace: Workspace, runner: Runner,
                 state: SessionState, board: ExperimentBoard, keeper: Keeper, session_id: Callable[[], int],
                 proposer: Callable[[Lane], Proposer], gate: LaunchGate | None = None, metrics: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.workspace = workspace
        self.runner = runner
        self.state = state
        self.board = board
        self.keeper = keeper
        self.session_id = session_id
        self.proposer = proposer  # the lane's proposer, asked for the fix of a crashed candidate
        self.gate = gate
        self.metrics = metrics

    def execute(self, lane: Lane, experiment: ExperimentRecord, stop: StopCondition) -> None:
        running = self.state.running(experiment.id)
        if running is None:
            raise KeyError(f"experiment {experiment.id} was not claimed by this session")
        if stop.kill_due():
            running.cancel.set(RunStatus.INTERRUPTED)
        if self.gate is not None and lane.gpu_uuid is not None:
            self.gate.attach_run(lane.gpu_uuid, running.cancel)
        if self.metrics is not None:
            self.metrics.lane_busy(lane.name, True)
        self.board.show_lane(lane, "running", experiment)
        with bind_experiment(experiment.id, lane=lane.name, kind=experiment.kind):
            log.info("experiment started", attempt=experiment.attempt, seed=experiment.seed,
                     description=experiment.description[:120])
            try:
                outcome = self.runner.run(
                    experiment.id, experiment.attempt, experiment.source, experiment.seed,
                    gpu_uuid=lane.gpu_uuid, cancel=running.cancel,
                    on_stage=lambda stage: self.on_stage(lane, experiment, stage))
                self.finish(lane, experiment, outcome, running)
            except TransitionError as exc:
                if not self.board.lease_lost(experiment.id):
                    self.push_back(experiment, f"{type(exc).__name__}: {exc}")
                    raise
                # Our lease expired and another daemon took the experiment over: its run stands, ours is dropped.
                log.warning("lease lost; leaving the experiment to its new owner", error=str(exc)[:300])
                self.state.forget_unconfirmed(experiment.id)
            except BaseException as exc:
                self.push_back(experiment, f"{type(exc).__name__}: {exc}")
                raise
            finally:
                if self.gate is not None and lane.gpu_uuid is not None:
                    self.gate.detach_run(lane.gpu_uuid)
                if self.metrics is not None:
                    self.metrics.lane_busy(lane.name, False)
                self.board.show_lane(lane, "idle")
                self.state.untrack(experiment.id)

    def on_stage(self, lane: Lane, experiment: ExperimentRecord, stage: str) -> None:
        if stage == "eval":
            self.board.transition(experiment.id, "running", "evaluating")
            self.board.show_lane(lane, "evaluating", experiment)

    def finish(self, lane: Lane, experiment: ExperimentRecord, outcome: Any, running: Running) -> None:
        fields = outcome_fields(outcome)
        status = str(getattr(outcome.status, "value", outcome.status))
        if self.metrics is not None:
            self.observe_stages(outcome)
            if lane.gpu_uuid is not None:
                # The runner checks after each killed run whether the GPU's memory came back.
                self.metrics.gpu_quarantined(lane.gpu_uuid, bool(getattr(outcome, "gpu_quarantined", False)))
        if lane.gpu_uuid is not None and getattr(outcome, "gpu_quarantined", False):
            self.state.quarantine(lane.gpu_uuid)
            log.error("GPU quarantined: no more experiments on it this session", lane=lane.name, gpu=lane.gpu_uuid)
        self.count_infra_error(status, str(fields.get("error") or f"sandbox run {status}"))
        if status == "ok" and outcome.val_bpb is not None:
            self.ensure_evaluating(experiment.id)
            final = self.keeper.record(experiment, float(outcome.val_bpb), fields)
            self.state.measured()
        elif status in ("interrupted", "preempted", "infra_error"):
            final = "preempted" if status == "preempted" else "interrupted"
            fields.setdefault("error", f"sandbox run {status}")
            self.board.transition(experiment.id, ACTIVE, final, **fields)
            killed_by_stop = status == "interrupted" and running.cancel.reason is RunStatus.INTERRUPTED
            if killed_by_stop:
                # The session is ending: the next session redoes it (see `WorkSource.find_leftovers`).
                self.keeper.interrupt(experiment.parent_id, "its confirmation run was cut short by a stop")
            else:
                self.retry_copy(experiment, f"sandbox run {status}")
            self.keeper.abandon(experiment, f"its confirmation run was {final}")
        else:
            final = status if status in CRASH_STATUSES else "invalid"
            self.board.transition(experiment.id, ACTIVE, final, **fields)
            self.after_crash(lane, experiment, final, fields)
        with bind_experiment(experiment.id, lane=lane.name, kind=experiment.kind):
            log.info("experiment finished", status=final, val_bpb=fields.get("val_bpb"),
                     seconds=round(time.monotonic() - running.started, 1))
        self.workspace.write_results(self.store.results_tsv(self.session_id()))
        if self.metrics is not None:
            self.metrics.experiment_finished(experiment.kind, final, lane.name, fields.get("val_bpb"),
                                             time.monotonic() - running.started)
            self.metrics.consecutive_crashes(self.state.crash_streak)

    def count_infra_error(self, status: str, error: str) -> None:
        """A sandbox that keeps failing is a broken set-up: stop the session instead of retrying forever."""
        if status != "infra_error":
            self.state.sandbox_ran()
            return
        failures = self.state.sandbox_failed()
        if failures >= MAX_ATTEMPTS:
            self.state.fail(f"the sandbox failed {failures} runs in a row: {error[:300]} "
                            "(check `autoresearch doctor` and the [sandbox] settings)")

    def observe_stages(self, outcome: Any) -> None:
        overhead = getattr(outcome, "overhead_seconds", None) or {}
        for stage, result in (("train", outcome.train), ("eval", outcome.eval)):
            if result is not None:
                self.metrics.stage_finished(stage, result.wall_seconds, float(overhead.get(stage, 0.0)))

    def ensure_evaluating(self, experiment_id: int) -> None:
        current = self.store.get_experiment(experiment_id)
        if current is not None and current.status == "running":
            self.board.transition(experiment_id, "running", "evaluating")

    def after_crash(self, lane: Lane, experiment: ExperimentRecord, status: str, fields: dict[str, Any]) -> None:
        if experiment.kind == "baseline":
            self.state.fail(baseline_failure(experiment.id, status, str(fields.get("error", "")),
                                             str(fields.get("log_tail", ""))))
            return
        if experiment.kind in ("noise", "remeasure"):
            return
        if experiment.kind == "confirm":
            self.keeper.abandon(experiment, f"its confirmation run {status}")
            return
        crashes = self.state.crashed()
        if crashes >= self.settings.judge.max_consecutive_crashes:
            log.error("too many consecutive crashes; stopping the session", crashes=crashes)
            self.state.fail(f"{crashes} experiments crashed in a row (judge.max_consecutive_crashes)")
            return
        if experiment.kind == "candidate" and not self.state.is_fix(experiment.id):
            # One fix attempt: the agent sees the failure (fenced, truncated) and may repair the idea.
            self.proposer(lane).prefetch(CrashInfo(experiment.id, experiment.description, status,
                                                   str(fields.get("log_tail", ""))[-4000:], experiment.diff))

    def push_back(self, experiment: ExperimentRecord, why: str) -> None:
        """Before an error propagates: mark the experiment interrupted and queue it again."""
        try:
            current = self.store.get_experiment(experiment.id)
            if current is not None and current.status in ACTIVE:
                self.board.transition(experiment.id, ACTIVE, "interrupted", error=why[:2000])
                self.retry_copy(experiment, why)
        except Exception as exc:  # the store may be the reason; lease expiry requeues it on the next start
            log.error("could not push the experiment back", experiment_id=experiment.id, error=str(exc)[:300])

    def retry_copy(self, experiment: ExperimentRecord, why: str) -> ExperimentRecord | None:
        if experiment.kind == "confirm" or experiment.attempt >= MAX_ATTEMPTS:
            return None
        copy: ExperimentRecord = self.store.create_experiment(
            experiment.session_id, experiment.kind, experiment.source, parent_id=experiment.parent_id,
            description=experiment.description, hypothesis=experiment.hypothesis, diff=experiment.diff,
            seed=experiment.seed, attempt=experiment.attempt + 1, source_hash=experiment.source_hash)
        log.info("experiment queued again", experiment_id=experiment.id, retry_id=copy.id, why=why[:200])
        return copy
