"""The keep rule over simulated nights: the old rule, today's rule and the new defaults, on two landscapes.

A night is 100 runs on one lane. The "agent" proposes changes whose true effects are known (in sigma, the
noise of one baseline run). The landscapes are pinned in docs/judge.md (written before any setting was
tuned on them): `kind` (the first round's: effects 0 or clearly +-1..3 sigma, one sigma, no crashes) and
`harsh` (effects with most mass near zero, deletions, crashes, timeouts, drift, per-change noise, a seed
term shared by every source, repeated and near-duplicate ideas).

The new pipeline is the project's own code: `daemon.research.planner.next_move` decides what runs next
(baseline, noise, re-measures, candidates, with their seeds), and `daemon.research.keeper.Keeper` records
every run and applies `daemon.research.judge.decide` over an in-memory stand-in of the store (the calls the
session makes on Postgres). The old pipeline replays the loop this one replaced (`judge.LegacyRule`).

Common random numbers: every policy meets the same idea sequence, drift path and noise (each run's noise is
drawn from the night and the run's (source, seed, repeat)), so a gain difference between two policies is
a mean of per-night differences, with its standard error.

Per night: keeps, keeps that are not real improvements (docs/judge.md), true gain, recorded-best bias and
runs per purpose; over all nights: kept at 1/2/3 sigma and false keeps of no-effect changes.

Columns: the old rule (`LegacyRule`), today's rule (before issue 22), the defaults before this round (no retry
of a timed-out confirmation), the new defaults, and any `--column` settings.

    python bench/judge_sim.py [--nights 400] [--seed 2] [--landscape harsh|kind|both] [--set key=value ...]
                              [--column key=value,key=value ...]
    python bench/judge_sim.py --calibrate     # upstream's rule (keep any lower run): its keep share
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import math
import random
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, cast

import structlog

from daemon.agents import edits
from daemon.config import JudgeConfig
from daemon.research import planner
from daemon.research.archive import unified_diff
from daemon.research.judge import Decision, LegacyRule
from daemon.research.keeper import Keeper
from daemon.research.measurements import incumbent_rows, recorded_value
from daemon.store.records import TERMINAL_STATUSES, ExperimentRecord

SIGMA = 0.01
BASE_VALUE = 1.0
SLOTS = 200
FAMILIES = 12
RUNS_PER_NIGHT = 100
NOT_REAL_DELETION = -0.25  # a kept deletion costing more than this (sigma) is not a real improvement
_EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)
normalized_hash = functools.lru_cache(maxsize=4096)(edits.normalized_hash)

ROUND_3 = {"false_keep_rate": 0.05, "max_runs": 5, "boundary_shape": 0.5, "boundary_looks": "all"}  # round 3's boundary
TODAY = {"paired": False, "simplicity_alpha": None, "simplicity_margin_sigma": 0.0, "futility_t": 0.5,  # before issue 22
         "remeasure_every": 6, "keep_min_runs": 1, **ROUND_3}
BEFORE = dict(ROUND_3)  # the defaults of round 3 (Pocock's boundary over every look, 5% per candidate, 5 runs at most)


# -- the landscapes (docs/judge.md) ---------------------------------------------------------------------


@dataclass(frozen=True)
class Idea:
    slot: int
    family: int
    gain: float  # in sigma; > 0 is better
    deletion: bool = False  # applying it removes a code line
    noise: float = 1.0  # its sigma, in units of the baseline's
    crashes: bool = False


@dataclass(frozen=True)
class Landscape:
    name: str
    seed_share: float  # share of a run's variance from a seed term shared by every source
    drift_step: float  # sd of the machine's random-walk offset per run
    timeout_rate: float  # chance that a candidate or confirmation run times out
    repeat_rate: float
    near_duplicate_rate: float

    def draw(self, rng: random.Random, slot: int) -> Idea:
        family = rng.randrange(FAMILIES)
        if self.name == "kind":
            roll = rng.random()
            gain = 0.0 if roll < 0.55 else -rng.uniform(0.5, 3.0) if roll < 0.80 else float(rng.choice((1, 2, 3)))
            return Idea(slot, family, gain)
        if rng.random() < 0.15:
            return Idea(slot, family, rng.gauss(-0.3, 0.5), deletion=True, noise=math.exp(rng.gauss(0.0, 0.25)))
        roll = rng.random()
        gain = rng.gauss(-0.1, 0.35) if roll < 0.65 else -rng.expovariate(1 / 1.5) if roll < 0.90 \
            else rng.expovariate(1.0)
        return Idea(slot, family, gain, noise=math.exp(rng.gauss(0.0, 0.25)), crashes=rng.random() < 0.08)


KIND = Landscape("kind", seed_share=0.0, drift_step=0.0, timeout_rate=0.0, repeat_rate=0.0, near_duplicate_rate=0.0)
HARSH = Landscape("harsh", seed_share=0.4, drift_step=0.03, timeout_rate=0.02, repeat_rate=0.10,
                  near_duplicate_rate=0.10)
LANDSCAPES = {"kind": KIND, "harsh": HARSH}


def true_gain(applied: frozenset[int], ideas: dict[int, Idea]) -> float:
    """Sum of harms, plus the largest gain of each family (changes of one family overlap)."""
    harm = sum(ideas[s].gain for s in applied if ideas[s].gain < 0)
    best_of: dict[int, float] = {}
    for slot in applied:
        idea = ideas[slot]
        if idea.gain > 0:
            best_of[idea.family] = max(best_of.get(idea.family, 0.0), idea.gain)
    return harm + sum(best_of.values())


class World:
    """One night's landscape with common random numbers: the k-th proposal, the drift after t runs and the
    noise of a run of (source, seed, repeat) are the same for every policy."""

    def __init__(self, land: Landscape, night: int, seed: int) -> None:
        self.land = land
        self.key = f"{land.name}:{seed}:{night}"
        rng = random.Random(f"{self.key}:ideas")
        self.ideas: dict[int, Idea] = {}
        self.sequence: list[int] = []  # slot of the k-th proposal
        for k in range(3 * RUNS_PER_NIGHT):
            roll = rng.random()
            if k and roll < land.repeat_rate:
                self.sequence.append(self.sequence[rng.randrange(k)])
                continue
            slot = len(self.ideas)
            if k and roll < land.repeat_rate + land.near_duplicate_rate:
                twin = self.ideas[self.sequence[rng.randrange(k)]]
                self.ideas[slot] = replace(twin, slot=slot, gain=twin.gain + rng.gauss(0.0, 0.1))
            else:
                self.ideas[slot] = land.draw(rng, slot)
            self.sequence.append(slot)
        walk = random.Random(f"{self.key}:drift")
        self.drift = list(itertools.accumulate(walk.gauss(0.0, land.drift_step) for _ in range(4 * RUNS_PER_NIGHT)))
        self._seed_terms: dict[int, float] = {}

    def value(self, applied: frozenset[int]) -> float:
        """The true val_bpb of a source (drift excluded)."""
        return BASE_VALUE - SIGMA * true_gain(applied, self.ideas)

    def expected(self, applied: frozenset[int], t: int) -> float:
        """What a run at time t measures on average (true value + the machine's drift)."""
        return self.value(applied) + SIGMA * self.drift[t]

    def crashes(self, applied: frozenset[int], seed: int, repeat: int, may_time_out: bool) -> bool:
        return self.failure(applied, seed, repeat, may_time_out) is not None

    def failure(self, applied: frozenset[int], seed: int, repeat: int, may_time_out: bool) -> str | None:
        """How a run fails, as the sandbox reports it: `crashed` (the idea's code), `timeout` (the machine), or None."""
        if any(self.ideas[s].crashes for s in applied):
            return "crashed"
        timed_out = may_time_out and random.Random(f"{self.key}:to:{sorted(applied)}:{seed}:{repeat}").random() \
            < self.land.timeout_rate
        return "timeout" if timed_out else None

    def measure(self, applied: frozenset[int], seed: int, repeat: int, t: int) -> float:
        share = self.land.seed_share
        if seed not in self._seed_terms:
            self._seed_terms[seed] = random.Random(f"{self.key}:seed:{seed}").gauss(0.0, 1.0)
        own = random.Random(f"{self.key}:run:{sorted(applied)}:{seed}:{repeat}").gauss(0.0, 1.0)
        scale = max((self.ideas[s].noise for s in applied), default=1.0)
        return self.expected(applied, t) + SIGMA * scale * (math.sqrt(share) * self._seed_terms[seed]
                                                             + math.sqrt(1 - share) * own)


def source_of(applied: frozenset[int], ideas: dict[int, Idea]) -> str:
    """A train.py stand-in: a line `d<slot> = 0` for each deletion not applied (applying it removes the line),
    a line `c<slot> = 1` for each other idea applied."""
    lines = [f"d{slot} = 0" for slot, idea in ideas.items() if idea.deletion and slot not in applied]
    lines += [f"c{slot} = 1" for slot in sorted(applied) if not ideas[slot].deletion]
    return "\n".join(lines) + "\n"


def applied_of(source: str, ideas: dict[int, Idea]) -> frozenset[int]:
    present = set(source.split())
    return frozenset(slot for slot, idea in ideas.items()
                     if (f"d{slot}" not in present if idea.deletion else f"c{slot}" in present))


# -- an in-memory store with the calls the keeper and planner make --------------------------------------


def _record(**values: Any) -> ExperimentRecord:
    defaults: dict[str, Any] = {
        "lane": "sim", "gpu_uuid": None, "attempt": 1, "seed": 0, "status": "queued", "description": "", "hypothesis": "",
        "diff": "", "source_sha256": "", "commit": "", "val_bpb": None, "training_seconds": None,
        "total_seconds": None, "peak_vram_mb": None, "mfu_percent": None, "total_tokens_m": None, "num_steps": None,
        "num_params_m": None, "depth": None, "eval_seconds": None, "probe": "", "exit_code": None, "oom": False,
        "log_tail": "", "error": "", "lease_owner": "sim", "lease_expires_at": None, "created_at": _EPOCH,
        "started_at": None, "finished_at": None, "parent_id": None, "parent2_id": None, "verdict": None,
    }
    defaults.update(values)
    return ExperimentRecord(**defaults)


@dataclass
class SimStore:
    rows: dict[int, ExperimentRecord] = field(default_factory=dict)
    clock: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]

    def create_experiment(self, session_id: int, kind: str, source: str, **kw: Any) -> ExperimentRecord:
        row = _record(id=len(self.rows) + 1, session_id=session_id, kind=kind, source=source,
                      source_hash=kw.pop("source_hash", ""), **kw)
        self.rows[row.id] = row
        return row

    def transition(self, experiment_id: int, expected: str | tuple[str, ...], new: str, *, owner: str | None = None,
                   **fields: Any) -> ExperimentRecord:
        row = self.rows[experiment_id]
        assert row.status in ((expected,) if isinstance(expected, str) else expected), (row.status, expected)
        finished = _EPOCH + timedelta(seconds=next(self.clock)) if new in TERMINAL_STATUSES else row.finished_at
        self.rows[experiment_id] = replace(row, status=new, finished_at=finished, **fields)
        return self.rows[experiment_id]

    def claim(self) -> ExperimentRecord | None:
        queued = [r for r in self.rows.values() if r.status == "queued"]
        if not queued:
            return None
        row = min(queued, key=lambda r: r.id)
        self.rows[row.id] = replace(row, status="evaluating")
        return self.rows[row.id]

    def get_experiment(self, experiment_id: int) -> ExperimentRecord | None:
        return self.rows.get(experiment_id)

    def list_experiments(self, session_id: int | None = None, status: str | None = None, limit: int = 50,
                         kind: str | None = None) -> list[ExperimentRecord]:
        found = [r for r in self.rows.values() if (status is None or r.status == status)
                 and (kind is None or r.kind == kind)]
        return sorted(found, key=lambda r: -r.id)[:limit]

    def best(self, session_id: int) -> ExperimentRecord | None:
        kept = [r for r in self.rows.values() if r.status == "kept" and r.val_bpb is not None]
        return max(kept, key=lambda r: (r.finished_at or _EPOCH, r.id)) if kept else None

    def seen_hashes(self, session_id: int) -> set[str]:
        return {r.source_hash for r in self.rows.values()}

    def add_noise(self, *_args: Any) -> None:
        return None

    def results_tsv(self, session_id: int) -> str:
        return ""


class SimWorkspace:
    def main_commit(self) -> str:
        return "0" * 40

    def commit_kept(self, tag: str, source: str, message: str) -> str:
        return "1" * 40

    def write_results(self, text: str) -> None:
        return None


# -- one night ---------------------------------------------------------------------------------------


@dataclass
class Night:
    judged: list[tuple[float, bool, bool]] = field(default_factory=list)  # (true effect, kept, deletion)
    not_real_keeps: list[dict[str, Any]] = field(default_factory=list)  # what each not-real keep looked like
    runs: Counter[str] = field(default_factory=Counter)  # runs per purpose
    bias: float = 0.0  # recorded best - what its runs measure on average, in sigma
    gain: float = 0.0  # true gain of the final best, in sigma

    @property
    def keeps(self) -> int:
        return sum(kept for _, kept, _ in self.judged)

    @property
    def not_real(self) -> int:
        return sum(kept and not is_real(effect, deletion) for effect, kept, deletion in self.judged)


def is_real(effect: float, deletion: bool) -> bool:
    return effect >= NOT_REAL_DELETION if deletion else effect > 0


class Proposer:
    """The agent: the night's idea sequence, applied to the current best; an exact repeat of a tried source is
    refused before a run (the session's seen hashes), and the next idea is taken."""

    def __init__(self, world: World) -> None:
        self.world, self.k = world, 0

    def next(self, best: frozenset[int], seen: Callable[[str], bool]) -> frozenset[int]:
        while True:
            slot = self.world.sequence[self.k % len(self.world.sequence)]
            self.k += 1
            candidate = best - {slot} if slot in best else best | {slot}
            if not seen(normalized_hash(source_of(candidate, self.world.ideas))):
                return candidate


@dataclass(frozen=True)
class Screen:
    """A cheaper first look (issue item 5), simulated only: an ASSUMED model, nothing on this machine measured it.

    Before its first full run, a new candidate trains for `cost` of the time budget (a screen: `cost` of a run).
    What the screen shows, in sigma of a full run: the idea's effect + an idea-specific transfer error
    Normal(0, `transfer_sd`) (what a short schedule shows of a change that matters late in training), minus
    `slow_penalty` for the `slow_share` of ideas that are slower per step (a fixed-time short run loses more of
    their steps), + the screen's noise Normal(0, `noise_sd`) against the best's screen (the best's screen is
    taken as known: one screen per new best is charged). A crashing idea crashes its screen. The candidate
    gets its full runs (the daemon's rule, unchanged) only when the screen shows more than `threshold`."""

    cost: float = 0.25
    threshold: float = -0.5
    noise_sd: float = 2.0
    transfer_sd: float = 0.5
    slow_share: float = 0.2
    slow_penalty: float = 0.5

    def shows(self, world: World, slot: int, effect: float, k: int) -> float:
        rng = random.Random(f"{world.key}:screen:{slot}")  # per idea: its transfer error and whether it is slow
        transfer, slow = rng.gauss(0.0, self.transfer_sd), rng.random() < self.slow_share
        noise = random.Random(f"{world.key}:screen-run:{slot}:{k}").gauss(0.0, self.noise_sd)
        return effect + transfer - (self.slow_penalty if slow else 0.0) + noise


def new_night(config: JudgeConfig, world: World, screen: Screen | None = None) -> Night:
    """The daemon's planner and keeper over 100 runs (with `screen`: new candidates screened first)."""
    settings = SimpleNamespace(judge=config)  # the keeper reads only the [judge] section
    store, night, ideas = SimStore(), Night(), world.ideas
    keeper = Keeper(settings=cast(Any, settings), store=store, workspace=cast(Any, SimWorkspace()), owner="sim",
                    session_id=lambda: 1, tag=lambda: "sim", lock=threading.RLock())
    proposer = Proposer(world)
    effect: dict[int, tuple[float, bool]] = {}
    expected: dict[int, float] = {}
    repeats: Counter[tuple[frozenset[int], int]] = Counter()
    spent, screened_best = 0.0, -1
    while spent < RUNS_PER_NIGHT - 1e-9:
        t = int(spent)
        row = store.claim()
        if row is None:
            rows = list(store.rows.values())
            best = store.best(1)
            plan = planner.next_move(rows, best, config)
            if plan.move is planner.Move.BASELINE:
                base = source_of(frozenset(), ideas)
                store.create_experiment(1, "baseline", base, source_hash=normalized_hash(base))
            elif plan.move is planner.Move.NOISE:
                base_row = next(r for r in rows if r.kind == "baseline")
                store.create_experiment(1, "noise", base_row.source, seed=plan.seed, source_hash=base_row.source_hash)
            elif plan.move is planner.Move.REMEASURE and best is not None:
                store.create_experiment(1, "remeasure", best.source, parent_id=best.id, seed=plan.seed,
                                        source_hash=best.source_hash)
            elif plan.move is planner.Move.CANDIDATE and best is not None:
                parent = applied_of(best.source, ideas)
                seen = store.seen_hashes(1)
                applied = proposer.next(parent, seen.__contains__)
                source = source_of(applied, ideas)
                toggled = next(iter(applied ^ parent))
                deletion = ideas[toggled].deletion and toggled in applied
                size = (world.value(parent) - world.value(applied)) / SIGMA
                if screen is not None:
                    if screened_best != best.id:  # the new best's own screen
                        screened_best, spent = best.id, spent + screen.cost
                        night.runs["screen"] += screen.cost
                    spent += screen.cost
                    night.runs["screen"] += screen.cost
                    crashed = any(ideas[s].crashes for s in applied)
                    if crashed or screen.shows(world, toggled, size, proposer.k) <= screen.threshold:
                        # screened out: no full run; a row of its own kind, so that the planner does not count it
                        # as a judged candidate and the proposer does not offer the same source again
                        out = store.create_experiment(1, "screen", source, parent_id=best.id,
                                                      source_hash=normalized_hash(source))
                        store.claim()
                        store.transition(out.id, "evaluating", "crashed" if crashed else "discarded")
                        if not crashed:
                            night.judged.append((size, False, deletion))
                        continue
                created = store.create_experiment(1, "candidate", source, parent_id=best.id,
                                                  diff=unified_diff(best.source, source),
                                                  seed=planner.first_seed(rows, best, config),
                                                  source_hash=normalized_hash(source))
                effect[created.id] = (size, deletion)
            else:
                raise AssertionError(plan)
            row = store.claim()
            assert row is not None, plan
        night.runs[row.kind] += 1
        spent += 1.0
        applied = applied_of(row.source, ideas)
        repeat = repeats[(applied, row.seed)]
        repeats[(applied, row.seed)] += 1
        failure = world.failure(applied, row.seed, repeat, may_time_out=row.kind in ("candidate", "confirm"))
        if failure is not None:  # as the session does: the run's status first, then the keeper (running.py)
            night.runs["crashed"] += 1
            store.transition(row.id, "evaluating", failure)
            keeper.abandon(row, failure)
            continue
        value = world.measure(applied, row.seed, repeat, t)
        expected[row.id] = world.expected(applied, t)
        keeper.record(row, value, {"val_bpb": value})
    for row_id, (size, deletion) in effect.items():
        final = store.rows[row_id]
        if final.status in ("kept", "discarded"):
            night.judged.append((size, final.status == "kept", deletion))
            if final.status == "kept" and not is_real(size, deletion) and final.verdict is not None:
                toggled = next(iter(applied_of(final.source, ideas) ^ applied_of(store.rows[final.parent_id or 0].source,
                                                                                 ideas)))
                night.not_real_keeps.append({"effect": size, "noise": ideas[toggled].noise, "deletion": deletion,
                                             **{k: final.verdict[k] for k in ("rule", "n", "paired", "t", "df")}})
    best = store.best(1)
    assert best is not None
    rows = list(store.rows.values())
    recorded = recorded_value(rows, best)
    reference = [expected[r.id] for r in incumbent_rows(rows, best)]
    night.bias = ((recorded or 0.0) - sum(reference) / len(reference)) / SIGMA
    night.gain = true_gain(applied_of(best.source, ideas), ideas)
    return night


def old_night(config: JudgeConfig, world: World) -> Night:
    """The loop this one replaced: sigma from baseline + noise runs, one run vs the best's one run, one
    confirmation (`k = 0, min_delta = 0, confirm = False`: upstream's rule, keep any lower run)."""
    night, t, seen = Night(), 0, set[frozenset[int]]()
    repeats: Counter[tuple[frozenset[int], int]] = Counter()
    proposer = Proposer(world)

    def run(applied: frozenset[int], seed: int, kind: str) -> float | None:
        nonlocal t
        night.runs[kind] += 1
        repeat = repeats[(applied, seed)]
        repeats[(applied, seed)] += 1
        t += 1
        if world.crashes(applied, seed, repeat, may_time_out=kind in ("candidate", "confirm")):
            night.runs["crashed"] += 1
            return None
        return world.measure(applied, seed, repeat, t - 1)

    baseline = [v for seed in range(1 + config.noise_runs)
                if (v := run(frozenset(), seed, "baseline" if seed == 0 else "noise")) is not None]
    std = _std(baseline) if len(baseline) > 1 else 0.0
    best_set, best_value, best_t = frozenset[int](), baseline[0], 0
    seen.add(best_set)
    while t < RUNS_PER_NIGHT:
        candidate = _next_unseen(proposer, best_set, seen)
        seen.add(candidate)
        toggled = next(iter(candidate ^ best_set))
        deletion = world.ideas[toggled].deletion and toggled in candidate
        effect = (world.value(best_set) - world.value(candidate)) / SIGMA
        first_t = t
        first = run(candidate, 0, "candidate")
        if first is None:
            continue
        decision = LegacyRule.first_look(first, best_value, std, config)
        if decision is Decision.CONFIRM and t < RUNS_PER_NIGHT:
            second = run(candidate, 1000 + t, "confirm")
            decision = Decision.DISCARD if second is None else \
                LegacyRule.confirmed([first, second], best_value, std, config)
        kept = decision is Decision.KEEP
        night.judged.append((effect, kept, deletion))
        if kept:
            best_set, best_value, best_t = candidate, first, first_t  # the old loop stored the first run
    night.bias = (best_value - world.expected(best_set, best_t)) / SIGMA
    night.gain = true_gain(best_set, world.ideas)
    return night


def _next_unseen(proposer: Proposer, best: frozenset[int], seen: set[frozenset[int]]) -> frozenset[int]:
    while True:
        candidate = proposer.next(best, lambda h: False)
        if candidate not in seen:
            return candidate


def _std(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# -- the table ---------------------------------------------------------------------------------------


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def summarize(nights: list[Night], reference: list[Night] | None) -> dict[str, str]:
    """One column: per-night figures (mean ± standard error over nights) and rates over all judged changes."""
    judged = [item for night in nights for item in night.judged]

    def rate(low: float, high: float, deletion: bool = False) -> str:
        hits = [kept for effect, kept, d in judged if low <= effect < high and d == deletion]
        return f"{sum(hits) / len(hits):.1%} (n={len(hits)})" if hits else "-"

    def per_night(values: list[float], digits: int = 2) -> str:
        mean, se = mean_se(values)
        return f"{mean:.{digits}f} ± {se:.{digits}f}"

    keeps = sum(n.keeps for n in nights)
    not_real = sum(n.not_real for n in nights)
    table = {
        "keeps / night": per_night([float(n.keeps) for n in nights]),
        "not-real keeps / night": per_night([float(n.not_real) for n in nights]),
        "share of keeps not real": f"{not_real / keeps:.1%}" if keeps else "-",
        "nights with a not-real keep": f"{sum(n.not_real > 0 for n in nights) / len(nights):.0%}",
        "false keeps (|effect| < 0.05)": rate(-0.05, 0.05),
        "kept at 1 sigma": rate(0.5, 1.5),
        "kept at 2 sigma": rate(1.5, 2.5),
        "kept at 3 sigma": rate(2.5, 3.5),
        "deletions kept, effect >= 0": rate(0.0, 99.0, deletion=True),
        "deletions kept, effect < -0.5": rate(-99.0, -0.5, deletion=True),
        "recorded-best bias (sigma)": per_night([n.bias for n in nights]),
        "true gain / night (sigma)": per_night([n.gain for n in nights]),
    }
    if reference is not None:
        diffs = [a.gain - b.gain for a, b in zip(nights, reference, strict=True)]
        mean, se = mean_se(diffs)
        ratio = sum(n.gain for n in nights) / sum(n.gain for n in reference) if sum(n.gain for n in reference) else 0.0
        table["gain - old rule (sigma)"] = f"{mean:+.2f} ± {se:.2f}"
        table["gain / old rule"] = f"{ratio:.2f}x"
    for kind in ("candidate", "confirm", "remeasure", "noise", "crashed", "screen"):
        table[f"runs: {kind}"] = f"{sum(n.runs[kind] for n in nights) / len(nights):.1f}"
    return table


GRID_FIGURES = ("share of keeps not real", "not-real keeps / night", "kept at 2 sigma", "recorded-best bias (sigma)",
                "true gain / night (sigma)", "gain - old rule (sigma)", "gain / old rule", "deletions kept, effect >= 0",
                "deletions kept, effect < -0.5", "kept at 3 sigma", "runs: candidate", "runs: confirm", "runs: remeasure",
                "runs: screen")


def print_table(title: str, table: dict[str, dict[str, str]]) -> None:
    rows = list(dict.fromkeys(r for column in table.values() for r in column))
    width = max(len(r) for r in rows) + 2
    cols = {name: max(24, len(name) + 2) for name in table}
    print(title)
    print("".ljust(width) + "".join(name.rjust(cols[name]) for name in table))
    for row in rows:
        print(row.ljust(width) + "".join(table[name].get(row, "").rjust(cols[name]) for name in table))
    print()


def settings(pairs: list[str], base: dict[str, Any] | None = None) -> JudgeConfig:
    values: dict[str, Any] = dict(base or {})
    for item in pairs:
        key, _, value = item.partition("=")
        values[key] = None if value == "none" else value
    return JudgeConfig(**values)


def policy(spec: str) -> tuple[JudgeConfig, Screen | None]:
    """A grid or column spec: [judge] settings, and `screen=1` / `screen_<field>=value` for the screening model."""
    pairs = [p for p in spec.split(",") if p]
    judge = [p for p in pairs if not p.startswith("screen")]
    screening = {k.removeprefix("screen_"): float(v) for k, _, v in (p.partition("=") for p in pairs)
                 if k.startswith("screen_")}
    on = any(p.startswith("screen") for p in pairs)
    return settings(judge), (Screen(**screening) if on else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nights", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--landscape", choices=("kind", "harsh", "both"), default="both")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [judge] setting for the 'new' column, e.g. --set max_runs=4 (repeatable)")
    parser.add_argument("--calibrate", action="store_true", help="upstream's rule only: its keep share")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=VALUE,KEY=VALUE",
                        help="instead of the table: one line per setting (repeatable), against the old rule")
    parser.add_argument("--column", action="append", default=[], metavar="KEY=VALUE,KEY=VALUE",
                        help="one more column of the table with these settings, optionally named: "
                        "'LABEL:KEY=VALUE,...' (repeatable)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    names = ("kind", "harsh") if args.landscape == "both" else (args.landscape,)
    for name in names:
        worlds = [World(LANDSCAPES[name], i, args.seed) for i in range(args.nights)]
        if args.calibrate:
            upstream = JudgeConfig(k=0.0, min_delta=0.0, confirm=False)
            nights = [old_night(upstream, w) for w in worlds]
            runs = sum(sum(n.runs.values()) for n in nights)
            print(f"{name}: upstream's rule keeps {sum(n.keeps for n in nights) / runs:.1%} of runs "
                  f"({sum(n.keeps for n in nights) / len(nights):.1f} of {RUNS_PER_NIGHT} per night; "
                  "upstream's published nights: 15/83 = 18%, ~18% of 125)")
            continue
        old = [old_night(JudgeConfig(), w) for w in worlds]
        if args.grid:
            for spec in args.grid:
                config, screen = policy(spec)
                t = summarize([new_night(config, w, screen) for w in worlds], old)
                print(f"{name} {spec or 'defaults'}: " + "; ".join(f"{k} {t[k]}" for k in GRID_FIGURES), flush=True)
            continue
        columns = {
            "old rule": old,
            "today's rule": [new_night(settings([], TODAY), w) for w in worlds],
            "defaults before": [new_night(settings([], BEFORE), w) for w in worlds],
            "new defaults" + (" + " + " ".join(args.set) if args.set else ""):
                [new_night(settings(args.set), w) for w in worlds],
        }
        for spec in args.column:
            label, _, values = spec.rpartition(":")
            config, screen = policy(values)
            columns[label or values] = [new_night(config, w, screen) for w in worlds]
        table = {col: summarize(nights, None if col == "old rule" else old) for col, nights in columns.items()}
        print_table(f"{name} landscape, {args.nights} nights x {RUNS_PER_NIGHT} runs, seed {args.seed} "
                    "(same ideas and noise for every column; ± = standard error over nights)", table)
    if not (args.calibrate or args.grid):
        print("targets (harsh): share of keeps not real <= 5%, kept at 2 sigma >= 70%, |bias| <= 0.2 sigma, "
              "gain >= 1.25x the old rule's (difference > 2 SE)")


if __name__ == "__main__":
    main()
