"""The planner: what a free lane runs next, decided from the session's rows alone.

Order of work: queued rows first (retries, confirmations, re-measures: the store hands them out oldest
first), then the baseline, then the noise floor (the baseline again with `noise_runs` other seeds), then
a re-measure of the best when one is due, then work an earlier session left unfinished, then a new
candidate: the agent's idea, or under `search = archive` every `archive_every`-th time a near-miss
re-tried on the current best (`daemon.research.archive`).

Re-measures keep the judge honest: a new best is run `remeasure_after_keep` more times (its recorded
value becomes the mean of these fresh runs, free of the luck that won its keep), and the best is run again
every `remeasure_every` candidates (its mean and the pooled noise sharpen as the night goes).

Seeds (`look_seed`, `remeasure_seed`): the baseline runs seed 0 and its noise runs seeds 1..noise_runs; a
re-measure of the best runs the smallest seed its source has not used; a candidate's k-th look runs the
best's k-th reference seed (the seed of its k-th fresh run), so that every look has an incumbent run on the
same seed to be paired with (see `daemon.research.judge.Pairs`).

Pure functions over rows (`RunRow`), shared by the session and `bench/judge_sim.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from daemon.config import JudgeConfig
from daemon.research import measurements
from daemon.research.measurements import RunRow

ACTIVE = ("running", "evaluating")
PENDING = ("queued", *ACTIVE)
CRASH_STATUSES = ("crashed", "timeout", "oom", "invalid")
NOT_RUN = ("interrupted", "preempted")
CONFIRM_SEED_OFFSET = 1000
REMEASURE_SEED_OFFSET = 500_000


class Move(str, Enum):
    WAIT = "wait"  # another lane measures what everything else depends on
    BASELINE = "baseline"
    BASELINE_FAILED = "baseline-failed"
    NOISE = "noise"
    REMEASURE = "remeasure"
    CANDIDATE = "candidate"  # leftovers of earlier sessions, then a new candidate


@dataclass(frozen=True)
class Plan:
    move: Move
    seed: int = 0
    failed: RunRow | None = None  # the crashed baseline (BASELINE_FAILED)


def next_move(rows: Sequence[RunRow], best: RunRow | None, config: JudgeConfig) -> Plan:
    """The next thing to run when nothing is queued (see the module docstring)."""
    baselines = [r for r in rows if r.kind == "baseline"]
    if not any(r.status == "kept" for r in baselines):
        if any(r.status in PENDING for r in baselines):
            return Plan(Move.WAIT)
        failed = next((r for r in baselines if r.status in CRASH_STATUSES), None)
        if failed is not None:
            return Plan(Move.BASELINE_FAILED, failed=failed)
        return Plan(Move.BASELINE)
    noise = [r for r in rows if r.kind == "noise"]
    if len([r for r in noise if r.status not in NOT_RUN]) < config.noise_runs:
        return Plan(Move.NOISE, seed=1 + len(noise))
    if any(r.kind in ("baseline", "noise") and r.status in PENDING for r in rows):
        return Plan(Move.WAIT)
    if best is not None and remeasure_due(rows, best, config):
        return Plan(Move.REMEASURE, seed=remeasure_seed(best, rows, config))
    return Plan(Move.CANDIDATE)


def remeasures(rows: Sequence[RunRow], best: RunRow) -> list[RunRow]:
    return [r for r in rows if r.kind == "remeasure" and r.parent_id == best.id]


def remeasure_due(rows: Sequence[RunRow], best: RunRow, config: JudgeConfig) -> bool:
    """Whether the best should be run again now: fresh runs after a keep, then every `remeasure_every` candidates."""
    own = remeasures(rows, best)
    if any(r.status in PENDING for r in own):
        return False  # one at a time
    tried = [r for r in own if r.status not in NOT_RUN]
    if best.kind != "baseline" and len(tried) < config.remeasure_after_keep:
        return True
    if config.remeasure_every <= 0:
        return False
    anchor = max([best.id, *(r.id for r in tried)])
    judged = [r for r in rows if r.kind in ("candidate", "manual") and r.id > anchor
              and r.status in ("kept", "discarded")]
    return len(judged) >= config.remeasure_every


def remeasure_seed(best: RunRow, rows: Sequence[RunRow], config: JudgeConfig) -> int:
    """A seed no other run of this source used (a repeat under the same seed would measure nothing new).

    Paired (`config.paired`): the smallest such seed, so that the best's fresh runs cover the seeds its
    candidates' looks will use (`look_seed`); else the seed of the rule before pairing, distinct per best."""
    if config.paired:
        return fresh_seed(rows, best)
    return REMEASURE_SEED_OFFSET + best.id * 100 + len(remeasures(rows, best)) + 1


def fresh_seed(rows: Sequence[RunRow], best: RunRow) -> int:
    """The smallest seed that no run of the best's source used (queued, running or done)."""
    used = {r.seed for r in rows if r.id == best.id or (best.source_hash and r.source_hash == best.source_hash)}
    seed = 0
    while seed in used:
        seed += 1
    return seed


def reference_seeds(rows: Sequence[RunRow], best: RunRow) -> list[int]:
    """The seeds of the best's runs that its candidates are compared on (`measurements.incumbent_rows`), in order."""
    seeds: list[int] = []
    for row in measurements.incumbent_rows(rows, best):
        if row.seed not in seeds:
            seeds.append(row.seed)
    return seeds


def look_seed(rows: Sequence[RunRow], best: RunRow, look: int) -> tuple[int, bool]:
    """The seed of a candidate's `look`-th run (1 = its first) under pairing, and whether the best needs a run
    under it first (a pair run).

    Look k uses the best's k-th reference seed, so that look and incumbent run share it (the seed's share of
    the noise cancels in their difference). A look beyond the best's reference runs uses the best's next
    fresh seed, and the best is run under it too. When the best changes mid-candidate, the candidate's
    earlier looks may have no partner under the new best: the judge then falls back to the unpaired test."""
    seeds = reference_seeds(rows, best)
    if look <= len(seeds):
        return seeds[look - 1], False
    return fresh_seed(rows, best), True


def first_seed(rows: Sequence[RunRow], best: RunRow | None, config: JudgeConfig) -> int:
    """The seed of a new candidate's first run: the best's first reference seed under pairing, else 0."""
    if not config.paired or best is None:
        return 0
    seeds = reference_seeds(rows, best)
    return seeds[0] if seeds else 0


def confirm_seed(candidate_seed: int, candidate_id: int, look: int) -> int:
    """Unpaired (`paired = false`): the seed of a candidate's `look`-th run, distinct for every look."""
    return candidate_seed + CONFIRM_SEED_OFFSET * (look - 1) + candidate_id


def archive_turn(candidates_planned: int, config: JudgeConfig) -> bool:
    """Under `search = archive`, whether the next candidate should come from the near-miss archive."""
    return config.search == "archive" and candidates_planned > 0 and (candidates_planned + 1) % config.archive_every == 0
