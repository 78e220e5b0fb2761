"""bench/judge_sim.py: its landscapes, common random numbers, and nights through the project's keeper."""

from __future__ import annotations

import pytest

from bench import judge_sim as sim
from daemon.config import JudgeConfig
from daemon.research.judge import ChangeSize


def test_every_policy_meets_the_same_ideas_and_noise() -> None:
    """Two worlds of one night agree on the idea sequence, and a run's noise depends on its (source, seed,
    repeat, time) only, not on what was measured before."""
    first, second = sim.World(sim.HARSH, 3, 1), sim.World(sim.HARSH, 3, 1)
    assert first.sequence == second.sequence and first.ideas == second.ideas
    applied = frozenset({first.sequence[0]})
    second.measure(frozenset(), 5, 0, 0)  # another run first
    assert first.measure(applied, 0, 0, 7) == second.measure(applied, 0, 0, 7)
    assert first.measure(applied, 0, 0, 7) != first.measure(applied, 1, 0, 7)


def test_another_night_is_another_landscape() -> None:
    """Nights differ in their ideas (the standard error over nights is over independent nights)."""
    assert sim.World(sim.HARSH, 1, 1).sequence != sim.World(sim.HARSH, 2, 1).sequence or \
        sim.World(sim.HARSH, 1, 1).ideas != sim.World(sim.HARSH, 2, 1).ideas


def test_harsh_landscape_has_what_docs_pin() -> None:
    """Deletions, crashing ideas, repeats, per-change noise and a seed share: the pinned ingredients are drawn."""
    ideas = [idea for night in range(20) for idea in sim.World(sim.HARSH, night, 1).ideas.values()]
    assert 0.10 < sum(i.deletion for i in ideas) / len(ideas) < 0.20
    assert 0.03 < sum(i.crashes for i in ideas) / len(ideas) < 0.12
    assert len({round(i.noise, 6) for i in ideas}) > 100
    kind = [i for night in range(5) for i in sim.World(sim.KIND, night, 1).ideas.values()]
    assert not any(i.deletion or i.crashes or i.noise != 1.0 for i in kind)


def test_a_deletion_removes_a_code_line() -> None:
    """The stand-in train.py: applying a deletion idea removes one line (the simplicity rule's input)."""
    world = sim.World(sim.HARSH, 0, 1)
    slot = next(s for s, idea in world.ideas.items() if idea.deletion)
    before, after = sim.source_of(frozenset(), world.ideas), sim.source_of(frozenset({slot}), world.ideas)
    assert ChangeSize.between(before, after).net == -1
    assert sim.applied_of(after, world.ideas) == frozenset({slot})


@pytest.mark.parametrize("what, effect, deletion, real", [
    ("a gain", 0.1, False, True), ("no effect", 0.0, False, False), ("a harm", -0.3, False, False),
    ("a cheap deletion", -0.2, True, True), ("a costly deletion", -0.3, True, False)])
def test_what_counts_as_a_real_improvement(what: str, effect: float, deletion: bool, real: bool) -> None:
    """As pinned in docs/judge.md: effect > 0, or a deletion costing less than a quarter sigma."""
    assert sim.is_real(effect, deletion) is real, what


def test_a_night_spends_its_runs_through_the_keeper() -> None:
    """A harsh night of the new defaults spends exactly 100 runs (crashes included) and judges candidates."""
    night = sim.new_night(JudgeConfig(), sim.World(sim.HARSH, 0, 1))
    assert sum(night.runs[k] for k in ("baseline", "noise", "candidate", "confirm", "remeasure")) == 100
    assert night.judged and night.runs["noise"] == JudgeConfig().noise_runs


def test_the_old_rule_night_spends_its_runs() -> None:
    """The replayed old loop also spends 100 runs on the same world."""
    night = sim.old_night(JudgeConfig(), sim.World(sim.HARSH, 0, 1))
    assert sum(night.runs[k] for k in ("baseline", "noise", "candidate", "confirm")) == 100


def test_a_timeout_is_reported_as_a_timeout() -> None:
    """The simulator reports how a run failed as the sandbox does: an idea's crash as `crashed`, machine trouble on a
    candidate or confirmation run as `timeout` (which the keeper retries for a confirmation), never on other runs."""
    world = sim.World(sim.HARSH, 0, 1)
    crashing = next(s for s, idea in world.ideas.items() if idea.crashes)
    assert world.failure(frozenset({crashing}), 0, 0, may_time_out=True) == "crashed"
    failures = [world.failure(frozenset(), seed, 0, may_time_out=True) for seed in range(2000)]
    assert set(failures) == {None, "timeout"} and 0.01 < failures.count("timeout") / 2000 < 0.03
    assert all(world.failure(frozenset(), seed, 0, may_time_out=False) is None for seed in range(200))


def test_a_screened_night_spends_short_runs_first() -> None:
    """Under the screening model, new candidates first cost a screen (a quarter run): screened-out and crashing ideas
    never get a full run, and the night's budget (full runs + screens) is still about 100 runs."""
    world = sim.World(sim.HARSH, 0, 1)
    plain, screened = sim.new_night(JudgeConfig(), world), sim.new_night(JudgeConfig(), world, sim.Screen())
    full = sum(screened.runs[k] for k in ("baseline", "noise", "candidate", "confirm", "remeasure"))
    assert 100 <= full + screened.runs["screen"] < 101
    assert screened.runs["screen"] > 0 and len(screened.judged) > len(plain.judged)
    assert screened.runs["crashed"] < plain.runs["crashed"]
