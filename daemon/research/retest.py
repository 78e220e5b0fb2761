"""The morning proof: the night's start best against its end best, re-run on fresh seeds, paired seed by seed.

The judge decides during the night with pooled noise and the incumbent's re-measures; nothing there checks
the night's end result against its start with runs that played no part in choosing it. The re-test does:
- **night**: the session's baseline (its start best) as arm a, its best (end best) as arm b, each run on k
  fresh seeds (no run of the night used them), interleaved a b a b ... so that a machine that drifts during
  the re-test hits both alike, paired by seed: d_i = b_i - a_i, delta = mean(d), and a Student-t interval
  on the pairs (`paired`). The night's gain **held** when the whole interval is below zero (lower bpb).
- **keep** (when time is left, `per_keep`): each kept change against its own parent, the same way; the share
  of keeps that held is the judge's real error rate, in production.
- **transfer** (off by default): the night comparison again at `transfer_budget_factor` times the budget.

Re-test runs are not research runs: they are stored apart (`daemon.store.retests`), never reach the judge's
noise pool, the crash streak, the planner or the agent's dedup. They go through the same runner (sandbox,
trusted eval, replay guard), one at a time on one lane. At the end of a window they use the time the session
driver reserved (`reserve_seconds`); what does not fit is recorded as skipped or partial, with why.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.config import RetestConfig
from daemon.ops.logs import get_logger
from daemon.research.judge import t_quantile
from daemon.store.records import ExperimentRecord
from daemon.store.retests import RetestRecord, RetestRunRecord
from sandbox.spec import Cancel, RunStatus

log = get_logger("autoresearch.retest")

# Seeds of re-test runs: far above every seed the night's planner uses (baseline 0, noise 1.., confirmations
# 1000 * look + id, re-measures 500_000 + 100 * id + n), and checked against the night's seeds anyway.
RETEST_SEED_BASE = 1_000_000_000
SEEDS_PER_SESSION = 1000
RETEST_ATTEMPT_BASE = 1000  # the runner's attempt number of re-test run i: its sandbox name and run folder
EXTRA_RUN_SECONDS = 60.0  # start-up + eval of one run, before any run of the session was timed
KEEP_KINDS = ("candidate", "manual")


class RetestRunner(Protocol):
    """`daemon.research.runner.StageRunner`: train + eval of one source under one seed."""

    def run(self, experiment_id: int, attempt: int, source: str, seed: int, gpu_uuid: str | None = None,
            cancel: Cancel | None = None, on_stage: Callable[[str], None] | None = None) -> Any: ...


class Clock(Protocol):
    """What the re-test asks of the window (`daemon.research.stop.StopCondition` answers it)."""

    def time_left(self) -> float | None: ...

    def signalled(self) -> bool: ...

    def kill_due(self) -> bool: ...


class Beat(Protocol):
    def beat(self) -> None: ...


@dataclass(frozen=True)
class Comparison:
    """One re-test, read back from the store: arm b minus arm a over the pairs that both measured."""

    retest: RetestRecord
    pairs: int
    delta: float | None  # mean of b - a (negative: b is better)
    half_width: float | None  # of the two-sided `confidence` t interval (None below 2 pairs)
    a_mean: float | None
    b_mean: float | None
    failed_runs: int

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.delta is None or self.half_width is None:
            return None
        return self.delta - self.half_width, self.delta + self.half_width

    @property
    def verdict(self) -> str:
        """held | not held | worse | skipped | too few pairs | running."""
        if self.retest.status == "skipped":
            return "skipped"
        interval = self.interval
        if interval is None:
            return "running" if self.retest.status == "running" else "too few pairs"
        if interval[1] < 0:
            return "held"
        return "worse" if interval[0] > 0 else "not held"

    @property
    def held(self) -> bool | None:
        verdict = self.verdict
        return True if verdict == "held" else False if verdict in ("not held", "worse") else None

    def line(self) -> str:
        """'Δ -0.012 ± 0.004 (re-tested on 3 fresh seeds)'-style text of the numbers."""
        if self.delta is None:
            return f"no pair measured ({self.retest.note or self.retest.status})"
        spread = f" ± {self.half_width:.6f}" if self.half_width is not None else " (no interval: 1 pair)"
        return f"Δ {self.delta:+.6f}{spread} (re-tested on {self.pairs} fresh seed{'s' if self.pairs != 1 else ''})"


def paired(a: Sequence[float], b: Sequence[float], confidence: float) -> tuple[float, float | None]:
    """Mean of b_i - a_i and the half-width of its two-sided t interval (None with fewer than 2 pairs)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired needs equal, non-empty sides, got {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    delta = math.fsum(diffs) / len(diffs)
    if len(diffs) < 2:
        return delta, None
    spread = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return delta, t_quantile(1.0 - (1.0 - confidence) / 2.0, len(diffs) - 1) * spread


def compare(retest: RetestRecord, runs: Sequence[RetestRunRecord], confidence: float) -> Comparison:
    """Pair a re-test's measured runs by seed and compare them."""
    by_seed: dict[int, dict[str, float]] = {}
    for run in runs:
        if run.val_bpb is not None and run.status == "measured":
            by_seed.setdefault(run.seed, {})[run.arm] = run.val_bpb
    pairs = [(sides["a"], sides["b"]) for _, sides in sorted(by_seed.items()) if len(sides) == 2]
    failed = sum(1 for run in runs if run.status != "measured")
    if not pairs:
        return Comparison(retest, 0, None, None, None, None, failed)
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    delta, half = paired(a, b, confidence)
    return Comparison(retest, len(pairs), delta, half, statistics.fmean(a), statistics.fmean(b), failed)


def comparisons(store: Any, session_ids: Sequence[int], confidence: float = 0.95) -> list[Comparison]:
    """Every re-test of these sessions with its numbers, oldest first."""
    retests = store.retests(list(session_ids))
    runs = store.retest_runs([r.id for r in retests]) if retests else []
    by_retest: dict[int, list[RetestRunRecord]] = {}
    for run in runs:
        by_retest.setdefault(run.retest_id, []).append(run)
    return [compare(r, by_retest.get(r.id, []), confidence) for r in retests]


def night_result(found: Sequence[Comparison]) -> Comparison | None:
    """The latest night comparison (an on-demand re-test after the window's counts as the newer one)."""
    nights = [c for c in found if c.retest.label == "night"]
    measured = [c for c in nights if c.pairs]
    chosen = measured or nights
    return chosen[-1] if chosen else None


def keep_results(found: Sequence[Comparison], keeps: Sequence[ExperimentRecord]) -> dict[int, Comparison]:
    """Each kept change's latest re-test against its parent (the night comparison counts when it is that pair)."""
    out: dict[int, Comparison] = {}
    for keep in keeps:
        matching = [c for c in found if c.retest.label in ("keep", "night") and c.retest.best_id == keep.id
                    and c.retest.base_id == keep.parent_id]
        measured = [c for c in matching if c.pairs]
        if matching:
            out[keep.id] = (measured or matching)[-1]
    return out


def held_ratio(results: dict[int, Comparison]) -> float | None:
    """Share of the re-tested keeps that held (None when none was decided)."""
    decided = [c.held for c in results.values() if c.held is not None]
    return sum(decided) / len(decided) if decided else None


def keep_notes(store: Any, session_ids: Sequence[int], rows: Sequence[ExperimentRecord]) -> dict[int, str]:
    """What the agent's ledger says of each re-tested keep among `rows` (the research line's nights' runs)."""
    found = comparisons(store, session_ids)
    if not found:
        return {}
    keeps = [r for r in rows if r.status == "kept" and r.kind in KEEP_KINDS and r.parent_id is not None]
    notes: dict[int, str] = {}
    if keeps:
        for keep_id, result in keep_results(found, keeps).items():
            if result.held is True:
                notes[keep_id] = f"held on re-test: {result.line()}"
            elif result.held is False:
                notes[keep_id] = (f"DID NOT HOLD on re-test ({result.verdict}): {result.line()}; its gain was "
                                  "not confirmed on fresh seeds and may be a fluke: check it before building on it")
    return notes


def kept_changes(store: Any, session_id: int) -> list[ExperimentRecord]:
    rows = store.list_experiments(session_id=session_id, status="kept", limit=100_000)
    return sorted((r for r in rows if r.kind in KEEP_KINDS and r.parent_id is not None), key=lambda r: r.id)


def run_seconds(store: Any, session_id: int, budget_s: float) -> float:
    """About how long one run takes: the median of the session's measured runs (never below the training
    budget), else the budget + a minute."""
    rows = store.list_experiments(session_id=session_id, limit=100_000)
    spans = [(r.finished_at - r.started_at).total_seconds() for r in rows
             if r.val_bpb is not None and r.started_at is not None and r.finished_at is not None]
    return max(statistics.median(spans), budget_s) if spans else budget_s + EXTRA_RUN_SECONDS


def reserve_seconds(store: Any, session_id: int, config: RetestConfig, budget_s: float,
                    cap_s: float | None = None) -> float:
    """The time the driver keeps free at the window's end: `reserve_runs` (default 2 k) runs, at most `cap_s`.

    Nothing while the night has kept no change (there would be nothing to re-test: research goes on to the end).
    """
    if not config.enabled:
        return 0.0
    best, baseline = store.best(session_id), store.baseline(session_id)
    if best is None or baseline is None or best.id == baseline.id:
        return 0.0
    reserve = config.reserved_runs() * run_seconds(store, session_id, budget_s)
    return min(reserve, cap_s) if cap_s is not None else reserve


class CachedReserve:
    """`reserve_seconds` for the stop condition, re-read from the store at most every `every_s` seconds."""

    def __init__(self, compute: Callable[[], float], every_s: float = 30.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._compute, self._every, self._monotonic = compute, every_s, monotonic
        self._value: float | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            now = self._monotonic()
            if self._value is None or now - self._at >= self._every:
                try:
                    self._value = self._compute()
                except Exception as exc:  # a database hiccup: keep the last answer (0 before any)
                    log.warning("re-test reserve not recomputed", error=str(exc)[:200])
                    self._value = self._value or 0.0
                self._at = now
            return self._value


@dataclass(frozen=True)
class _Pairing:
    label: str
    base: ExperimentRecord
    best: ExperimentRecord
    runner: RetestRunner
    budget_s: float


class Retest:
    """Plans and runs a session's re-tests (see the module docstring); `run` returns what it measured."""

    def __init__(self, *, store: Any, runner: RetestRunner, config: RetestConfig, budget_s: float,
                 gpu_uuid: str | None = None, transfer_runner: RetestRunner | None = None,
                 heartbeat: Beat | None = None) -> None:
        self.store, self.runner, self.config, self.budget_s = store, runner, config, budget_s
        self.gpu_uuid = gpu_uuid
        self.transfer_runner = transfer_runner
        self.heartbeat = heartbeat
        self._seconds_per_run = 0.0
        self._next_index = 0
        self._used: set[int] = set()

    # -- the plan --------------------------------------------------------------------------------

    def run(self, session_id: int, clock: Clock) -> list[Comparison]:
        """Re-test the night, then (time allowing) each keep, then (when on) the transfer check."""
        self._prepare(session_id)
        base, best = self.store.baseline(session_id), self.store.best(session_id)
        if base is None or best is None:
            self._skip(session_id, "night", base, best, "no baseline was measured: nothing to re-test")
        elif best.id == base.id:
            self._skip(session_id, "night", base, best, "no change was kept: the night ended where it started")
        else:
            self._compare(session_id, _Pairing("night", base, best, self.runner, self.budget_s), clock)
        if self.config.per_keep:
            night_pair = (base.id, best.id) if base is not None and best is not None else None
            for keep in kept_changes(self.store, session_id):
                if (keep.parent_id, keep.id) == night_pair:
                    continue  # the night comparison is this keep's re-test
                parent = self.store.get_experiment(keep.parent_id)
                if parent is None:
                    continue
                self._compare(session_id, _Pairing("keep", parent, keep, self.runner, self.budget_s), clock)
        if self.config.transfer and self.transfer_runner is not None and base is not None and best is not None \
                and best.id != base.id:
            budget = self.budget_s * self.config.transfer_budget_factor
            self._compare(session_id, _Pairing("transfer", base, best, self.transfer_runner, budget), clock,
                          scale=self.config.transfer_budget_factor)
        return comparisons(self.store, [session_id], self.config.confidence)

    def _prepare(self, session_id: int) -> None:
        rows = self.store.list_experiments(session_id=session_id, limit=100_000)
        earlier = self.store.retests([session_id])
        retest_seeds = {run.seed for run in self.store.retest_runs([r.id for r in earlier])} if earlier else set()
        self._used = {row.seed for row in rows} | retest_seeds
        first = RETEST_SEED_BASE + (session_id % 1_000_000) * SEEDS_PER_SESSION
        self._next_index = max((seed - first + 1 for seed in retest_seeds
                                if first <= seed < first + SEEDS_PER_SESSION), default=0)
        self._seconds_per_run = run_seconds(self.store, session_id, self.budget_s)

    def _fresh_seed(self, session_id: int) -> tuple[int, int]:
        """(seed, index) of the next seed no run of the night (and no earlier re-test of it) used."""
        first = RETEST_SEED_BASE + (session_id % 1_000_000) * SEEDS_PER_SESSION
        while self._next_index < SEEDS_PER_SESSION:
            index, self._next_index = self._next_index, self._next_index + 1
            if first + index not in self._used:
                self._used.add(first + index)
                return first + index, index
        raise RuntimeError(f"session {session_id} has used all {SEEDS_PER_SESSION} re-test seeds")

    def _skip(self, session_id: int, label: str, base: ExperimentRecord | None, best: ExperimentRecord | None,
              why: str, budget_s: float | None = None) -> None:
        log.info("re-test skipped", session=session_id, label=label, why=why)
        self.store.create_retest(session_id, label, base_id=base.id if base else None,
                                 best_id=best.id if best else None, budget_s=budget_s or self.budget_s,
                                 k=self.config.k, status="skipped", note=why)

    # -- one comparison ----------------------------------------------------------------------------

    def _compare(self, session_id: int, pairing: _Pairing, clock: Clock, scale: float = 1.0) -> None:
        k, pair_s = self.config.k, 2 * self._seconds_per_run * scale
        left = clock.time_left()
        if clock.signalled() or clock.kill_due():
            self._skip(session_id, pairing.label, pairing.base, pairing.best, "the daemon was stopping",
                       pairing.budget_s)
            return
        if left is not None and left < pair_s:
            self._skip(session_id, pairing.label, pairing.base, pairing.best,
                       f"the window ended early: {max(left, 0):.0f} s left, one pair of runs needs about "
                       f"{pair_s:.0f} s", pairing.budget_s)
            return
        if pairing.label == "keep" and left is not None and left < k * pair_s:
            self._skip(session_id, pairing.label, pairing.base, pairing.best,
                       f"not enough time left for {k} pairs ({max(left, 0):.0f} s left)", pairing.budget_s)
            return
        retest = self.store.create_retest(session_id, pairing.label, base_id=pairing.base.id,
                                          best_id=pairing.best.id, budget_s=pairing.budget_s, k=k)
        log.info("re-test started", session=session_id, label=pairing.label, base=pairing.base.id,
                 best=pairing.best.id, k=k)
        pairs = failures = 0
        why = ""
        while pairs < k:
            left = clock.time_left()
            if left is not None and left < pair_s:
                why = f"the window ended after {pairs} of {k} pairs"
                break
            if failures > k:
                why = f"runs failed on {failures} seeds"
                break
            seed, index = self._fresh_seed(session_id)
            measured = 0
            for arm, record in (("a", pairing.base), ("b", pairing.best)):  # interleaved: a b a b ...
                status, seconds = self._one_run(retest, arm, record, seed, index, pairing.runner, clock)
                measured += status == "measured"
                if status == "measured":  # the runs that really ran tell how long the next will take
                    self._seconds_per_run = max(self._seconds_per_run, seconds / scale)
                if status == "interrupted":
                    why = "a re-test run was interrupted (the daemon was stopping)"
                    break
                if status != "measured":
                    break  # this seed can make no pair: the next seed, without spending the other side's run
            if why:
                break
            pairs += measured == 2
            failures += measured < 2
        self.store.finish_retest(retest.id, "done" if pairs >= k else "partial", why)
        log.info("re-test finished", session=session_id, label=pairing.label, pairs=pairs, note=why)

    def _one_run(self, retest: RetestRecord, arm: str, record: ExperimentRecord, seed: int, index: int,
                 runner: RetestRunner, clock: Clock) -> tuple[str, float]:
        """Run `record`'s source under `seed` (in a thread, so the heartbeat goes on); store it; its status and
        wall seconds."""
        cancel = Cancel()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["outcome"] = runner.run(record.id, RETEST_ATTEMPT_BASE + index * 2 + (arm == "b"),
                                            record.source, seed, gpu_uuid=self.gpu_uuid, cancel=cancel)
            except BaseException as exc:  # re-raised in the calling thread below
                box["error"] = exc

        started = time.monotonic()
        thread = threading.Thread(target=work, name=f"retest-{retest.id}-{arm}", daemon=True)
        thread.start()
        while thread.is_alive():
            if self.heartbeat is not None:
                self.heartbeat.beat()
            if clock.kill_due() and cancel.reason is None:
                cancel.set(RunStatus.INTERRUPTED)
            thread.join(timeout=0.2)
        if "error" in box:
            raise box["error"]
        outcome = box["outcome"]
        status = str(getattr(outcome.status, "value", outcome.status))
        val_bpb = outcome.val_bpb if status == "ok" else None
        final = "measured" if status == "ok" and val_bpb is not None else status
        self.store.add_retest_run(retest.id, arm, record.id, seed, final,
                                  float(val_bpb) if val_bpb is not None else None,
                                  str(getattr(outcome, "error", "") or "")[:2000])
        return "interrupted" if status in ("interrupted", "preempted") else final, time.monotonic() - started
