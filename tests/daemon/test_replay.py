"""ReplayGuard: a bit-identical result of the same source under another seed is a replay."""

from __future__ import annotations

from daemon.research.replay import MAX_RUNS_PER_SOURCE, ReplayGuard


def test_same_checkpoint_under_another_seed_is_a_replay() -> None:
    """A byte-identical checkpoint from seed 2 after seed 1 is refused, naming the seed variable."""
    guard = ReplayGuard()
    assert guard.check("code", 1, "abc", 2.5) == ""
    assert "AUTORESEARCH_SEED" in guard.check("code", 2, "abc", 2.4)


def test_same_val_bpb_under_another_seed_is_a_replay() -> None:
    """An exactly equal val_bpb (different archive bytes) is refused too."""
    guard = ReplayGuard()
    guard.check("code", 1, "abc", 2.5)
    assert "bit-identical" in guard.check("code", 2, "def", 2.5)


def test_same_seed_and_other_sources_are_not_replays() -> None:
    """A retry under the same seed, and another source with the same numbers, pass."""
    guard = ReplayGuard()
    guard.check("code", 1, "abc", 2.5)
    assert guard.check("code", 1, "abc", 2.5) == ""
    assert guard.check("other code", 2, "abc", 2.5) == ""


def test_honest_reruns_pass_and_memory_is_bounded() -> None:
    """Different results under different seeds pass; only the last runs per source are kept."""
    guard = ReplayGuard()
    for seed in range(MAX_RUNS_PER_SOURCE + 10):
        assert guard.check("code", seed, f"sha{seed}", 2.0 + seed / 1000) == ""
    assert guard.check("code", 999, "sha0", 9.0) == ""  # the oldest run was forgotten
