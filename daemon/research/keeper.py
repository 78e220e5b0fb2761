"""The keeper: records each measured run and carries out the judge's verdicts in the store and the workspace.

A baseline is kept (the first best), noise runs and re-measures are recorded (they feed the pooled noise
and the best's mean), and a candidate is judged (`daemon.research.judge.decide`) on its runs against the
best's runs (`daemon.research.measurements`):
- keep: committed on the session branch, `kept` with the verdict's numbers;
- confirm: left `evaluating` while a confirmation run (another seed) is queued; each confirmation is
  another look of the sequential rule, until keep, discard or `max_runs`;
- discard: `discarded` with the verdict's numbers (a near-miss when it looked better: see `archive`).
A confirmation run that times out or is cut short by machine trouble is run again on its seed (`abandon`,
`confirm_retries`); a crash of the candidate's code discards it. Under `rule = posterior` the judge also
gets the effect prior fitted to the line's judged candidates (`_prior`).
Every decision is made under the session's lock, so two lanes never judge against the same old best.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.config import Settings
from daemon.errors import TransitionError
from daemon.ops.logs import get_logger
from daemon.research import measurements
from daemon.research.judge import ChangeSize, Decision, Pairs, Verdict, decide, paired_noise
from daemon.research.planner import confirm_seed, look_seed
from daemon.research.prior import EffectPrior
from daemon.research.step_spread import step_spread
from daemon.research.workspace import Workspace
from daemon.store.records import ExperimentRecord

log = get_logger("autoresearch.research")

RETRYABLE = ("timeout", "interrupted", "preempted")  # a confirmation's failures that are no evidence against the change


@dataclass
class Awaiting:
    """A close-call candidate (kept `evaluating`) waiting for its confirmation runs."""

    val_bpb: float  # its first run (not stored until its verdict)
    fields: dict[str, Any]


class Keeper:
    """Records measurements and applies verdicts for one session (see the module docstring)."""

    def __init__(self, *, settings: Settings, store: Any, workspace: Workspace, owner: str,
                 session_id: Callable[[], int], tag: Callable[[], str], lock: threading.RLock,
                 metrics: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.workspace = workspace
        self.owner = owner
        self._session_id = session_id
        self._tag = tag
        self._lock = lock
        self.metrics = metrics
        self.awaiting: dict[int, Awaiting] = {}

    def record(self, experiment: ExperimentRecord, val_bpb: float, fields: dict[str, Any]) -> str:
        """Record a measured experiment; returns its final status (or `evaluating` awaiting confirmation)."""
        with self._lock:
            return self._record_locked(experiment, val_bpb, fields)

    def _record_locked(self, experiment: ExperimentRecord, val_bpb: float, fields: dict[str, Any]) -> str:
        sid = self._session_id()
        if experiment.kind == "baseline":
            self._transition(experiment.id, "evaluating", "kept", commit=self.workspace.main_commit(), **fields)
            self.store.add_noise(sid, experiment.id, val_bpb, experiment.seed)
            if self.metrics is not None:
                self.metrics.baseline(val_bpb)
            self.publish()
            return "kept"
        if experiment.kind in ("noise", "remeasure"):
            self._transition(experiment.id, "evaluating", "measured", **fields)
            if experiment.kind == "noise":
                self.store.add_noise(sid, experiment.id, val_bpb, experiment.seed)
            self.publish()
            return "measured"
        if experiment.kind == "confirm":
            self._transition(experiment.id, "evaluating", "measured", **fields)
            self._settle(experiment)
            return "measured"
        verdict = self._verdict(experiment, [val_bpb], fields)
        if verdict.decision is Decision.KEEP:
            self._keep(experiment, fields, verdict)
            return "kept"
        if verdict.decision is Decision.CONFIRM:
            self.awaiting[experiment.id] = Awaiting(val_bpb, fields)
            self._queue_confirmation(experiment, look=2, why=verdict.reason)
            return "evaluating"
        self._transition(experiment.id, "evaluating", "discarded", verdict=verdict.as_record(), **fields)
        return "discarded"

    def _verdict(self, candidate: ExperimentRecord, first: list[float], fields: dict[str, Any]) -> Verdict:
        """Judge the candidate's runs (its first run, not stored yet, plus its measured confirmations)."""
        sid = self._session_id()
        best = self.store.best(sid)
        if best is None or best.val_bpb is None:
            raise RuntimeError(f"experiment {candidate.id} measured before the session had a best")
        rows = self.store.list_experiments(session_id=sid, limit=1_000_000)
        runs = first + measurements.runs_of(rows, candidate.id)
        noise = measurements.noise_of(rows, extra={candidate.source_hash or f"#{candidate.id}": first})
        peak = fields.get("peak_vram_mb")
        parent = next((row for row in rows if row.id == candidate.parent_id), None)
        change = ChangeSize.between(parent.source, candidate.source) if parent is not None else \
            ChangeSize.of_diff(candidate.diff)
        reference = measurements.incumbent_rows(rows, best)
        verdict = decide(runs, [float(r.val_bpb or 0.0) for r in reference], noise, self.settings.judge,
                         change=change, peak_memory_mb=float(peak) if isinstance(peak, int | float) else None,
                         pairs=self._pairs(rows, candidate, first, reference),
                         prior=self._prior(rows, removal=change.net < 0))
        log.info("verdict", experiment_id=candidate.id, best=best.id, decision=verdict.decision.value,
                 rule=verdict.rule, reason=verdict.reason)
        return verdict

    def _prior(self, rows: list[ExperimentRecord], removal: bool) -> EffectPrior | None:
        """Under the posterior rule: the distribution of effects fitted to the line's judged candidates of the
        same group (changes that remove code, or the others)."""
        config = self.settings.judge
        if config.rule != "posterior":
            return None
        center = -config.simplicity_margin_sigma if removal and config.simplicity else 0.0
        return EffectPrior.fit(measurements.judged_evidence(rows, removals=removal), config.prior_strength, center)

    def _pairs(self, rows: list[ExperimentRecord], candidate: ExperimentRecord, first: list[float],
               reference: Sequence[measurements.RunRow]) -> Pairs | None:
        """The candidate's looks paired by seed with the best's runs, and the paired noise pooled over the
        differences stored with earlier verdicts and this candidate's own (None when a look has no partner)."""
        if not self.settings.judge.paired:
            return None
        looks = [(candidate.seed, value) for value in first] + \
            [(r.seed, float(r.val_bpb or 0.0)) for r in measurements.look_rows(rows, candidate.id)]
        diffs = measurements.differences(looks, reference)
        if diffs is None:
            return None
        return Pairs(tuple(diffs), paired_noise([*measurements.paired_groups(rows), diffs]))

    def _queue_confirmation(self, candidate: ExperimentRecord, look: int, why: str) -> None:
        sid = self._session_id()
        seed = confirm_seed(candidate.seed, candidate.id, look)
        best = self.store.best(sid)
        if self.settings.judge.paired and best is not None:
            rows = self.store.list_experiments(session_id=sid, limit=1_000_000)
            seed, pair_run = look_seed(rows, best, look)
            if pair_run:  # the best has no run under this seed yet: run it first (queued rows go oldest first)
                self.store.create_experiment(
                    sid, "remeasure", best.source, parent_id=best.id, seed=seed, source_hash=best.source_hash,
                    description=f"re-measure the best #{best.id} (seed {seed}): the pair of #{candidate.id}'s run {look}")
        self.store.create_experiment(
            sid, "confirm", candidate.source, parent_id=candidate.id,
            description=f"confirm #{candidate.id} (run {look}): {candidate.description}"[:500], hypothesis=why[:2000],
            seed=seed, source_hash=candidate.source_hash)

    def _keep(self, experiment: ExperimentRecord, fields: dict[str, Any], verdict: Verdict) -> None:
        message = (f"{experiment.description or 'experiment'} (val_bpb {fields['val_bpb']:.6f}, "
                   f"mean improvement {verdict.improvement:.6f} over {verdict.n} run(s), {verdict.rule})")
        commit = self.workspace.commit_kept(self._tag(), experiment.source,
                                            f"{message}\n\nexperiment {experiment.id}: {verdict.reason}")
        kept = self._transition(experiment.id, "evaluating", "kept", commit=commit, verdict=verdict.as_record(),
                                **fields)
        if self.metrics is not None:
            rows = self.store.list_experiments(session_id=self._session_id(), limit=1_000_000)
            mean = measurements.recorded_value(rows, kept)
            if mean is not None:
                self.metrics.best(mean)
        log.info("new best kept", experiment_id=experiment.id, val_bpb=fields["val_bpb"], rule=verdict.rule,
                 commit=commit[:12])

    def _settle(self, confirm: ExperimentRecord) -> None:
        """A confirmation run was measured: another look at its candidate."""
        candidate_id = confirm.parent_id
        awaiting = self.awaiting.get(candidate_id) if candidate_id is not None else None
        if awaiting is None or candidate_id is None:
            return  # its candidate was settled already (e.g. redone after a daemon crash)
        candidate = self.store.get_experiment(candidate_id)
        if candidate is None or self.store.best(self._session_id()) is None:
            self.awaiting.pop(candidate_id, None)
            return
        verdict = self._verdict(candidate, [awaiting.val_bpb], awaiting.fields)
        if verdict.decision is Decision.CONFIRM:
            self._queue_confirmation(candidate, look=verdict.n + 1, why=verdict.reason)
            return
        self.awaiting.pop(candidate_id, None)
        if verdict.decision is Decision.KEEP:
            self._keep(candidate, awaiting.fields, verdict)
        else:
            self._transition(candidate.id, "evaluating", "discarded", verdict=verdict.as_record(), **awaiting.fields)
        self.workspace.write_results(self.store.results_tsv(self._session_id()))

    def interrupt(self, candidate_id: int | None, why: str) -> None:
        """A close-call candidate whose confirmation cannot happen in this session: interrupted, redone later."""
        with self._lock:
            awaiting = self.awaiting.pop(candidate_id, None) if candidate_id is not None else None
        if awaiting is not None and candidate_id is not None:
            self._transition(candidate_id, "evaluating", "interrupted", **{**awaiting.fields, "error": why})
            self._drop_queued_confirmation(candidate_id, why)

    def _drop_queued_confirmation(self, candidate_id: int, why: str) -> None:
        """The candidate's confirmation run, still queued: interrupted too, so no later session claims it."""
        for row in self.store.list_experiments(session_id=self._session_id(), status="queued", limit=100_000,
                                               kind="confirm"):
            if row.parent_id == candidate_id:
                try:
                    self.store.transition(row.id, "queued", "interrupted", error=why[:2000])
                except TransitionError:  # claimed meanwhile: it runs, and `_settle` ignores it
                    log.info("the confirmation run was claimed meanwhile", experiment_id=row.id)

    def abandon(self, confirm: ExperimentRecord, why: str) -> None:
        """A confirmation run that failed, already stored with its final status. Machine trouble (`RETRYABLE`:
        a timeout, a run cut short) is no evidence against the change: the same look is run again on the same
        seed, up to `confirm_retries` times per candidate. A crash, an out-of-memory or an invalid run, or
        machine trouble past the retries: its candidate is discarded."""
        if confirm.kind != "confirm" or confirm.parent_id is None:
            return
        with self._lock:
            if confirm.parent_id not in self.awaiting:
                return
            if self._retry_confirmation(confirm, why):
                return
            awaiting = self.awaiting.pop(confirm.parent_id)
        self._transition(confirm.parent_id, "evaluating", "discarded", **{**awaiting.fields, "error": why})

    def _retry_confirmation(self, confirm: ExperimentRecord, why: str) -> bool:
        """Queue the failed confirmation's look again when its failure was machine trouble (see `abandon`)."""
        current = self.store.get_experiment(confirm.id)
        if current is None or current.status not in RETRYABLE:
            return False
        failed = [r for r in self.store.list_experiments(session_id=self._session_id(), limit=100_000, kind="confirm")
                  if r.parent_id == confirm.parent_id and r.status in RETRYABLE]
        if len(failed) > self.settings.judge.confirm_retries:
            return False
        self.store.create_experiment(
            self._session_id(), "confirm", confirm.source, parent_id=confirm.parent_id,
            description=confirm.description, hypothesis=f"run again: {why}"[:2000], seed=confirm.seed,
            attempt=confirm.attempt + 1, source_hash=confirm.source_hash)
        log.info("confirmation run again", experiment_id=confirm.id, candidate=confirm.parent_id,
                 status=current.status, retries=len(failed))
        return True

    def publish(self) -> None:
        """The pooled noise and the best's recorded value (a mean) on the metrics."""
        if self.metrics is None:
            return
        sid = self._session_id()
        rows = self.store.list_experiments(session_id=sid, limit=1_000_000)
        noise = measurements.noise_of(rows)
        if noise.df:  # absent until a repeat measured it
            self.metrics.noise_std(noise.sigma)
        spread = step_spread(rows)
        if spread is not None:
            self.metrics.step_spread(spread.ratio)
            if spread.loaded:
                log.warning("machine load sets the noise", fewest_steps=spread.fewest, most_steps=spread.most,
                            experiments=list(spread.experiment_ids[:8]))
        best = self.store.best(sid)
        if best is not None:
            value = measurements.recorded_value(rows, best)
            if value is not None:
                self.metrics.best(value, best.finished_at)

    def _transition(self, experiment_id: int, expected: str | tuple[str, ...], new: str,
                    **fields: Any) -> ExperimentRecord:
        """A state change of one of our leased rows: refused (TransitionError) once another owner took it over."""
        record: ExperimentRecord = self.store.transition(experiment_id, expected, new, owner=self.owner, **fields)
        return record
