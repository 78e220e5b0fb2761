"""What a free lane runs next (`daemon.research.planner`), decided from the session's rows."""

from __future__ import annotations

from daemon.config import JudgeConfig
from daemon.research.planner import (
    Move,
    archive_turn,
    confirm_seed,
    first_seed,
    look_seed,
    next_move,
    remeasure_due,
    remeasure_seed,
)
from tests.daemon.rows import row

CONFIG = JudgeConfig(noise_runs=2, remeasure_after_keep=2, remeasure_every=3)


def _night_after_noise() -> list:
    return [row(1, "baseline", "kept", 1.0, source_hash="b"), row(2, "noise", "measured", 1.01, source_hash="b"),
            row(3, "noise", "measured", 0.99, source_hash="b")]


def test_baseline_first() -> None:
    """An empty session measures the baseline."""
    assert next_move([], None, CONFIG).move is Move.BASELINE


def test_wait_while_another_lane_measures_the_baseline() -> None:
    """A queued or running baseline makes other lanes wait."""
    assert next_move([row(1, "baseline", "running")], None, CONFIG).move is Move.WAIT


def test_crashed_baseline_is_reported() -> None:
    """A crashed baseline ends the planning with the failed row."""
    plan = next_move([row(1, "baseline", "crashed")], None, CONFIG)
    assert plan.move is Move.BASELINE_FAILED and plan.failed is not None and plan.failed.id == 1


def test_noise_runs_follow_with_distinct_seeds() -> None:
    """After the baseline, noise runs with seeds 1, 2; an interrupted one is redone under a new seed."""
    base = row(1, "baseline", "kept", 1.0)
    assert next_move([base], base, CONFIG).seed == 1
    plan = next_move([base, row(2, "noise", "interrupted")], base, CONFIG)
    assert (plan.move, plan.seed) == (Move.NOISE, 2)


def test_candidates_once_the_noise_floor_is_measured() -> None:
    """Baseline and noise done: the agent's candidates."""
    rows = _night_after_noise()
    assert next_move(rows, rows[0], CONFIG).move is Move.CANDIDATE


def test_a_new_best_is_remeasured() -> None:
    """A kept candidate gets `remeasure_after_keep` fresh runs, one at a time, then candidates resume."""
    best = row(4, "candidate", "kept", 0.95, source_hash="c")
    rows = [*_night_after_noise(), best]
    assert next_move(rows, best, CONFIG).move is Move.REMEASURE
    in_flight = [*rows, row(5, "remeasure", "running", parent_id=4)]
    assert next_move(in_flight, best, CONFIG).move is Move.CANDIDATE
    done = [*rows, row(5, "remeasure", "measured", 0.96, parent_id=4), row(6, "remeasure", "crashed", parent_id=4)]
    assert next_move(done, best, CONFIG).move is Move.CANDIDATE


def test_the_best_is_remeasured_every_few_candidates() -> None:
    """After `remeasure_every` judged candidates since its last run, the best runs again."""
    rows = _night_after_noise()
    judged = [row(4 + i, "candidate", "discarded", 1.0 + i / 100) for i in range(2)]
    assert not remeasure_due([*rows, *judged], rows[0], CONFIG)
    third = row(6, "candidate", "discarded", 1.05)
    assert remeasure_due([*rows, *judged, third], rows[0], CONFIG)
    again = row(7, "remeasure", "measured", 1.0, parent_id=1)
    assert not remeasure_due([*rows, *judged, third, again], rows[0], CONFIG)


def _kept_best() -> tuple[list, object]:
    """A kept candidate (#4, its looks on seeds 0 and 1) with two fresh re-measures on seeds 2 and 3."""
    best = row(4, "candidate", "kept", 0.95, source_hash="c", seed=0)
    rows = [*_night_after_noise(), best, row(5, "confirm", "measured", 0.94, source_hash="c", parent_id=4, seed=1),
            row(6, "remeasure", "measured", 0.96, source_hash="c", parent_id=4, seed=2),
            row(7, "remeasure", "measured", 0.97, source_hash="c", parent_id=4, seed=3)]
    return rows, best


def test_looks_use_the_bests_reference_seeds_in_order() -> None:
    """Look k of a candidate runs under the seed of the best's k-th fresh run (pairs exist for every look)."""
    base = [row(1, "baseline", "kept", 1.0, source_hash="b", seed=0),
            row(2, "noise", "measured", 1.01, source_hash="b", seed=1),
            row(3, "noise", "measured", 0.99, source_hash="b", seed=2)]
    assert [look_seed(base, base[0], k) for k in (1, 2, 3)] == [(0, False), (1, False), (2, False)]
    rows, best = _kept_best()
    assert [look_seed(rows, best, k)[0] for k in (1, 2)] == [2, 3]  # not the looks that won its keep
    assert first_seed(rows, best, CONFIG) == 2


def test_a_look_beyond_the_bests_runs_asks_for_a_pair_run() -> None:
    """A look the best has no run for takes a seed the best's source never used, and the best runs it too."""
    rows, best = _kept_best()
    assert look_seed(rows, best, 3) == (4, True)


def test_remeasures_take_the_smallest_seed_the_source_never_used() -> None:
    """Paired: a re-measure fills the next unused seed (so that it can pair); unpaired: the old distinct seed."""
    rows, best = _kept_best()
    assert remeasure_seed(best, rows, CONFIG) == 4
    assert remeasure_seed(best, rows, CONFIG.model_copy(update={"paired": False})) > 1000
    assert first_seed(rows, best, CONFIG.model_copy(update={"paired": False})) == 0


def test_confirmation_seeds_differ_per_look() -> None:
    """Unpaired: each look of a candidate runs under its own seed."""
    seeds = {confirm_seed(0, 42, look) for look in (2, 3, 4, 5)}
    assert len(seeds) == 4 and 0 not in seeds


def test_archive_turns_come_every_nth_candidate_only_under_archive() -> None:
    """search = archive: every archive_every-th candidate is a near-miss move; greedy never."""
    archive_config = JudgeConfig(search="archive", archive_every=4)
    assert [archive_turn(n, archive_config) for n in range(8)] == [False, False, False, True, False, False, False,
                                                                    True]
    assert not any(archive_turn(n, JudgeConfig(search="greedy")) for n in range(10))
