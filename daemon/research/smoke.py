"""The smoke run: every candidate first trains for seconds at tiny shapes, exports and passes the eval checks.

It runs in the proposer's thread, right after the agent proposes, through the same sandbox and the same
two stages as a full run, but with the `tiny` preset, a few seconds of budget, a small eval and no GPU
(so it never competes with the lane's running experiment). A failure goes back to the agent with its
traceback (fenced, truncated) for up to `training.smoke_repair_rounds` repairs; only a candidate that
passes is queued for a full run, so a NameError costs seconds instead of a full training budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from daemon.agents import Agent, CrashInfo, Proposal, ProposalContext
from daemon.agents.edits import normalized_hash
from daemon.config import Settings
from daemon.errors import InvalidProposal
from daemon.ops.logs import get_logger
from daemon.research.replay import ReplayGuard
from daemon.research.runner import StageRunner
from sandbox.spec import Cancel, Mount, RunSpec, RunStatus
from trainer.device_check import REQUIRE_ENV
from trainer.probe_power import FLOOR_ENV

log = get_logger("autoresearch.smoke")

SMOKE_STARTUP_S = 60.0  # imports and data loading on a busy CPU, on top of the smoke budget
SMOKE_CPUS = 2.0
SMOKE_COMPILE_S = 60.0  # the warm-up step (torch.compile where used) at tiny shapes
# What a smoke run can prove wrong with a candidate. A timeout is not among them: at tiny shapes on a
# busy CPU the harness's budget clock is noise, and the full run measures time properly.
SMOKE_FAILURES = ("crashed", "oom", "invalid")
# What a passed smoke run's record says of its eval (trainer/probe_power.py: too few rows for the probe).
SMOKE_EVAL_NOTE = "smoke eval check: the code path only, NOT a trust check (too few rows for the causality probe)"


class SmokeStageRunner(StageRunner):
    """A StageRunner whose sandbox runs are named and labelled as smoke stages, in their own folder."""

    def _spec(self, experiment_id: int, attempt: int, stage: str, command: tuple[str, ...],
              mounts: tuple[Mount, ...], env: dict[str, str], limits: Any, gpu_uuid: str | None,
              split_identities: bool = False) -> RunSpec:
        return super()._spec(experiment_id, attempt, f"smoke-{stage}", command, mounts, env, limits, None,
                             split_identities)


def smoke_stage_runner(runner: object, settings: Settings) -> SmokeStageRunner | None:
    """The runner's smoke twin (tiny preset, short budget, small eval, CPU), or None for a non-sandbox runner."""
    if not isinstance(runner, StageRunner):
        return None
    training = settings.training
    smoke = SmokeStageRunner.__new__(SmokeStageRunner)
    smoke.__dict__.update(runner.__dict__)
    smoke.train_env = {**runner.train_env, "AUTORESEARCH_TIME_BUDGET": str(training.smoke_budget_s),
                       "AUTORESEARCH_COMPILE_BUDGET": str(min(training.compile_budget_s, SMOKE_COMPILE_S)),
                       "AUTORESEARCH_PRESET": "tiny", REQUIRE_ENV: "0"}  # smoke runs are CPU runs
    # The smoke eval checks the code path, never causality: too few rows for the probe (trainer.probe_power).
    smoke.eval_env = {**runner.eval_env, "AUTORESEARCH_EVAL_TOKENS": str(training.smoke_eval_tokens),
                      "AUTORESEARCH_PRESET": "tiny", FLOOR_ENV: "0", REQUIRE_ENV: "0"}
    cpus = min(runner.train_limits.cpus or SMOKE_CPUS, SMOKE_CPUS)  # beside a GPU run: leave it the rest
    smoke.train_limits = replace(runner.train_limits, cpus=cpus,
                                 timeout_s=training.smoke_budget_s + SMOKE_COMPILE_S + SMOKE_STARTUP_S)
    smoke.eval_limits = replace(runner.eval_limits, cpus=cpus, timeout_s=min(runner.eval_limits.timeout_s, 120.0))
    smoke.work_dir = Path(runner.work_dir) / "smoke"
    smoke.compile_cache = None
    smoke.gpu_probe = None
    # Smoke runs are not scored runs (tiny shapes, seed 0, no experiment): they never reach the store's memory.
    smoke.replays = ReplayGuard()
    return smoke


@dataclass(frozen=True)
class SmokeResult:
    passed: bool
    status: str  # passed | crashed | timeout | oom | invalid | interrupted | infra_error
    error: str
    log_tail: str
    seconds: float


class SmokeTest:
    """Smoke-runs proposals and sends failures back to the agent; see the module docstring."""

    def __init__(self, runner: SmokeStageRunner, store: Any, repair_rounds: int, metrics: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._runner = runner
        self._store = store
        self._repair_rounds = repair_rounds
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._active: set[Cancel] = set()
        self._closed = False

    def close(self) -> None:
        """Stop the smoke runs in progress (the session is ending) and refuse new ones."""
        with self._lock:
            self._closed = True
            for cancel in self._active:
                cancel.set(RunStatus.INTERRUPTED)

    def run(self, session_id: int, proposal: Proposal, repair_round: int = 0) -> SmokeResult:
        """One smoke run of the proposal's source, recorded in the store."""
        smoke_id = self._store.start_smoke_run(session_id, proposal.description, normalized_hash(proposal.source),
                                               repair_round)
        started = self._clock()
        cancel = Cancel()
        with self._lock:
            if self._closed:
                cancel.set(RunStatus.INTERRUPTED)
            self._active.add(cancel)
        try:
            outcome = self._runner.run(smoke_id, 1, proposal.source, seed=0, gpu_uuid=None, cancel=cancel)
        finally:
            with self._lock:
                self._active.discard(cancel)
        seconds = self._clock() - started
        passed = outcome.status == "ok"
        status = "passed" if passed else str(outcome.status)
        tail = f"{outcome.log_tail}\n{SMOKE_EVAL_NOTE}" if passed else outcome.log_tail
        self._store.finish_smoke_run(smoke_id, status, seconds, outcome.error, tail)
        if self._metrics is not None:
            self._metrics.smoke_run(status, seconds)
        log.info("smoke run", smoke_id=smoke_id, status=status, seconds=round(seconds, 1),
                 description=proposal.description[:120], eval_check="code path only, not a trust check")
        return SmokeResult(passed, status, outcome.error, outcome.log_tail, seconds)

    def vet(self, agent: Agent, ctx: ProposalContext, proposal: Proposal, diff: Callable[[str, str], str]) -> Proposal:
        """The proposal once it passes its smoke run, repaired by the agent when it fails (up to N rounds).

        Only a crash, an OOM or an invalid checkpoint is the candidate's fault here; anything else (a
        timeout, sandbox trouble, an interrupted run) lets the proposal through to its full run, which
        measures time properly and meets infrastructure trouble where the session handles it.
        """
        for round_number in range(self._repair_rounds + 1):
            result = self.run(ctx.session_id, proposal, round_number)
            if result.status not in SMOKE_FAILURES:
                return proposal
            if round_number == self._repair_rounds:
                break
            crash = CrashInfo(experiment_id=0, description=proposal.description, status=result.status,
                              output_tail=f"{result.error}\n{result.log_tail}"[-4000:],
                              diff=diff(ctx.best_source, proposal.source), smoke=True)
            proposal = agent.propose(replace(ctx, crash=crash))
        raise InvalidProposal(f"the candidate failed its smoke run {self._repair_rounds + 1} times "
                              f"(last: {result.status}: {result.error[:200]})",
                              hint="no full run was spent on it; the agent is asked for another idea")
