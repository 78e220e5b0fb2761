"""The keep rule on a synthetic research landscape: old rule vs new, greedy search vs the near-miss archive.

A night is 100 runs on one lane. The "agent" proposes changes drawn from a landscape whose true effects
are known (in units of sigma, the noise of one run): most do nothing, some hurt, some help by 1, 2 or 3
sigma. Changes interact: each belongs to one of a few families, and changes of one family overlap (only
the family's largest gain counts), so a gain measured on one best may be gone on the next. Every run's
val_bpb is its true value plus Gaussian noise of sigma.

The new pipeline is the project's own code: `daemon.research.planner.next_move` decides what runs next
(baseline, noise, re-measures, candidates), `daemon.research.archive.pick_near_miss` makes the near-miss
moves, and `daemon.research.keeper.Keeper` records every run and applies `daemon.research.judge.decide`
over an in-memory stand-in of the store (the same calls the session makes on Postgres). The old pipeline
replays the loop this one replaced, with `daemon.research.judge.LegacyRule`.

Figures per pipeline (averaged over nights):
  false keeps        kept / judged, for candidates whose true effect on the best was exactly zero
  kept at 1/2/3 sig  kept / judged, for candidates that truly improved the best by about 1, 2, 3 sigma
  best bias          recorded best val_bpb - its true value, in sigma (negative: the record is too good)
  confirm runs       confirmation runs per night (re-measures of the best listed apart)
  true gain          true improvement of the final best over the baseline after 100 runs, in sigma

    python bench/judge_sim.py [--nights 300] [--seed 1]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, cast

import structlog

from daemon.agents.edits import normalized_hash
from daemon.config import JudgeConfig
from daemon.research import archive, planner
from daemon.research.archive import unified_diff
from daemon.research.judge import Decision, LegacyRule
from daemon.research.keeper import Keeper
from daemon.research.measurements import recorded_value
from daemon.store.records import TERMINAL_STATUSES, ExperimentRecord

SIGMA = 0.01
BASE_VALUE = 1.0
SLOTS = 110
FAMILIES = 12
RUNS_PER_NIGHT = 100
_EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


# -- the landscape --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Idea:
    slot: int
    family: int
    gain: float  # in sigma; > 0 is better


def draw_idea(rng: random.Random, slot: int) -> Idea:
    roll = rng.random()
    if roll < 0.55:
        gain = 0.0
    elif roll < 0.80:
        gain = -rng.uniform(0.5, 3.0)
    else:
        gain = float(rng.choice((1, 2, 3)))
    return Idea(slot, rng.randrange(FAMILIES), gain)


def true_gain(applied: frozenset[int], ideas: dict[int, Idea]) -> float:
    """Sum of harms, plus the largest gain of each family (changes of one family overlap)."""
    harm = sum(ideas[s].gain for s in applied if ideas[s].gain < 0)
    best_of: dict[int, float] = {}
    for slot in applied:
        idea = ideas[slot]
        if idea.gain > 0:
            best_of[idea.family] = max(best_of.get(idea.family, 0.0), idea.gain)
    return harm + sum(best_of.values())


def source_of(applied: frozenset[int]) -> str:
    """A train.py stand-in: one line per slot, far apart so that diffs of different slots never overlap."""
    lines = []
    for slot in range(SLOTS):
        lines += [f"# region {slot}.{k}" for k in range(4)]
        lines.append(f"c{slot} = {1 if slot in applied else 0}")
        lines += [f"# region {slot}.{k}" for k in range(4, 8)]
    return "\n".join(lines) + "\n"


def applied_of(source: str) -> frozenset[int]:
    return frozenset(int(line[1:line.index(" ")]) for line in source.splitlines()
                     if line.startswith("c") and line.endswith(" = 1"))


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
    judged: list[tuple[float, bool]] = field(default_factory=list)  # (true effect on the best, kept)
    confirm_runs: int = 0
    remeasure_runs: int = 0
    bias: float = 0.0  # recorded best - true best, in sigma
    gain: float = 0.0  # true gain of the final best, in sigma
    near_miss_moves: int = 0


class Landscape:
    def __init__(self, rng: random.Random, null: bool = False) -> None:
        self.rng = rng
        self.null = null  # every idea has no effect (the controlled false-keep trial)
        self.ideas: dict[int, Idea] = {}
        self.next_slot = 0

    def propose(self, best: frozenset[int]) -> frozenset[int]:
        slot = self.next_slot % SLOTS
        self.next_slot += 1
        self.ideas[slot] = Idea(slot, 0, 0.0) if self.null else draw_idea(self.rng, slot)
        return best | {slot} if slot not in best else best - {slot}

    def value(self, applied: frozenset[int]) -> float:
        return BASE_VALUE - SIGMA * true_gain(applied, self.ideas)

    def measure(self, applied: frozenset[int]) -> float:
        return self.value(applied) + SIGMA * self.rng.gauss(0.0, 1.0)


def new_night(config: JudgeConfig, rng: random.Random, first_only: bool = False) -> Night:
    """The daemon's planner, archive and keeper over 100 runs (or, `first_only`, until a first no-effect
    candidate is decided against the fresh baseline)."""
    settings = SimpleNamespace(judge=config)  # the keeper reads only the [judge] section
    land, store, night = Landscape(rng, null=first_only), SimStore(), Night()
    keeper = Keeper(settings=cast(Any, settings), store=store, workspace=cast(Any, SimWorkspace()), owner="sim",
                    session_id=lambda: 1, tag=lambda: "sim", lock=threading.RLock())
    effect_at_proposal: dict[int, float] = {}
    planned = 0
    for _ in range(RUNS_PER_NIGHT):
        row = store.claim()
        if row is None:
            rows = list(store.rows.values())
            best = store.best(1)
            plan = planner.next_move(rows, best, config)
            if plan.move is planner.Move.BASELINE:
                store.create_experiment(1, "baseline", source_of(frozenset()), source_hash=normalized_hash(
                    source_of(frozenset())))
            elif plan.move is planner.Move.NOISE:
                base = next(r for r in rows if r.kind == "baseline")
                store.create_experiment(1, "noise", base.source, seed=plan.seed, source_hash=base.source_hash)
            elif plan.move is planner.Move.REMEASURE and best is not None:
                store.create_experiment(1, "remeasure", best.source, parent_id=best.id, seed=plan.seed,
                                        source_hash=best.source_hash)
            elif plan.move is planner.Move.CANDIDATE and best is not None:
                parent_set = applied_of(best.source)
                picked = None
                if planner.archive_turn(planned, config):
                    picked = archive.pick_near_miss(rows, best, best.source, store.seen_hashes(1))
                planned += 1
                if picked is not None:
                    miss, source = picked
                    night.near_miss_moves += 1
                    kw: dict[str, Any] = {"parent2_id": miss.experiment_id}
                else:
                    source = source_of(land.propose(parent_set))
                    kw = {}
                created = store.create_experiment(1, "candidate", source, parent_id=best.id,
                                                  diff=unified_diff(best.source, source),
                                                  source_hash=normalized_hash(source), **kw)
                effect_at_proposal[created.id] = (land.value(parent_set) - land.value(applied_of(source))) / SIGMA
            row = store.claim()
            assert row is not None, plan
        night.confirm_runs += row.kind == "confirm"
        night.remeasure_runs += row.kind == "remeasure"
        value = land.measure(applied_of(row.source))
        keeper.record(row, value, {"val_bpb": value})
        if first_only and any(r.kind == "candidate" and r.status in ("kept", "discarded") for r in store.rows.values()):
            break
    for row_id, effect in effect_at_proposal.items():
        final = store.rows[row_id]
        if final.status in ("kept", "discarded") and final.parent2_id is None:
            night.judged.append((effect, final.status == "kept"))
    best = store.best(1)
    assert best is not None
    recorded = recorded_value(list(store.rows.values()), best)
    applied = applied_of(best.source)
    night.bias = ((recorded or 0.0) - land.value(applied)) / SIGMA
    night.gain = true_gain(applied, land.ideas)
    return night


def old_night(config: JudgeConfig, rng: random.Random) -> Night:
    """The loop this one replaced: sigma from baseline + 2 noise runs, one run vs the best's one run."""
    land, night = Landscape(rng), Night()
    baseline = [land.measure(frozenset()) for _ in range(1 + config.noise_runs)]
    std = _std(baseline)
    best_set, best_value = frozenset[int](), baseline[0]
    runs = len(baseline)
    while runs < RUNS_PER_NIGHT:
        candidate = land.propose(best_set)
        effect = (land.value(best_set) - land.value(candidate)) / SIGMA
        first = land.measure(candidate)
        runs += 1
        decision = LegacyRule.first_look(first, best_value, std, config)
        value = first
        if decision is Decision.CONFIRM and runs < RUNS_PER_NIGHT:
            second = land.measure(candidate)
            runs += 1
            night.confirm_runs += 1
            decision = LegacyRule.confirmed([first, second], best_value, std, config)
            value = first  # the old loop stored the candidate's first run as the best
        kept = decision is Decision.KEEP
        night.judged.append((effect, kept))
        if kept:
            best_set, best_value = candidate, value
    night.bias = (best_value - land.value(best_set)) / SIGMA
    night.gain = true_gain(best_set, land.ideas)
    return night


def old_first(config: JudgeConfig, rng: random.Random) -> bool:
    """The old loop's first candidate, with no effect, against the fresh baseline: kept?"""
    land = Landscape(rng, null=True)
    baseline = [land.measure(frozenset()) for _ in range(1 + config.noise_runs)]
    candidate = land.propose(frozenset())
    first = land.measure(candidate)
    decision = LegacyRule.first_look(first, baseline[0], _std(baseline), config)
    if decision is Decision.CONFIRM:
        decision = LegacyRule.confirmed([first, land.measure(candidate)], baseline[0], _std(baseline), config)
    return decision is Decision.KEEP


def _std(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# -- the table ---------------------------------------------------------------------------------------


def summarize(nights: list[Night]) -> dict[str, str]:
    judged = [item for night in nights for item in night.judged]

    def rate(low: float, high: float) -> str:
        hits = [kept for effect, kept in judged if low <= effect < high]
        return f"{sum(hits) / len(hits):.1%} (n={len(hits)})" if hits else "-"

    count = len(nights)
    return {
        "false keeps (effect 0)": rate(-1e-9, 1e-9),
        "kept at 1 sigma": rate(0.5, 1.5),
        "kept at 2 sigma": rate(1.5, 2.5),
        "kept at 3 sigma": rate(2.5, 3.5),
        "recorded-best bias (sigma)": f"{sum(n.bias for n in nights) / count:+.2f}",
        "confirm runs / night": f"{sum(n.confirm_runs for n in nights) / count:.1f}",
        "re-measure runs / night": f"{sum(n.remeasure_runs for n in nights) / count:.1f}",
        "near-miss moves / night": f"{sum(n.near_miss_moves for n in nights) / count:.1f}",
        "true gain after 100 runs (sigma)": f"{sum(n.gain for n in nights) / count:.2f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nights", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a [judge] setting for the new rule, e.g. --set max_runs=4 (repeatable)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    default = JudgeConfig(**dict(item.split("=", 1) for item in args.set))
    columns = {
        "old rule": [old_night(default, random.Random(args.seed * 100_003 + i)) for i in range(args.nights)],
        "new, greedy": [new_night(default.model_copy(update={"search": "greedy"}),
                                  random.Random(args.seed * 100_003 + i)) for i in range(args.nights)],
        "new, archive": [new_night(default.model_copy(update={"search": "archive"}),
                                   random.Random(args.seed * 100_003 + i)) for i in range(args.nights)],
    }
    table = {name: summarize(nights) for name, nights in columns.items()}
    trials = 10 * args.nights
    first_old = sum(old_first(default, random.Random(7_000_003 + i)) for i in range(trials)) / trials
    first_new = sum(any(kept for _, kept in new_night(default, random.Random(7_000_003 + i), first_only=True).judged)
                    for i in range(trials)) / trials
    for name, rate in (("old rule", first_old), ("new, greedy", first_new), ("new, archive", first_new)):
        table[name]["false keeps, first candidate"] = f"{rate:.1%} (n={trials})"
    rows = ["false keeps, first candidate", *(r for r in next(iter(table.values())) if r != "false keeps, first candidate")]
    width = max(len(r) for r in rows) + 2
    print(f"{args.nights} nights x {RUNS_PER_NIGHT} runs, seed {args.seed}; landscape: 55% no effect, 25% harmful, "
          f"20% helpful (1/2/3 sigma), {FAMILIES} overlapping families; 'first candidate': a no-effect change "
          "judged against the fresh baseline (baseline + noise runs only), old loop vs the project's keeper")
    print("".ljust(width) + "".join(name.rjust(22) for name in table))
    for row in rows:
        print(row.ljust(width) + "".join(table[name][row].rjust(22) for name in table))
    print("goals: false keeps <= 5%, >= 60% kept at 2 sigma, |recorded-best bias| <= 0.2 sigma")


if __name__ == "__main__":
    main()
