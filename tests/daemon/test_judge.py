"""The noise-aware keep rule."""

from __future__ import annotations

import math

import pytest

from daemon.config import JudgeConfig
from daemon.research.judge import Decision, judge, judge_confirmed, noise_margin

CONFIG = JudgeConfig(k=2.0, min_delta=0.001, confirm=True)


def test_margin_is_min_delta_when_noise_is_small() -> None:
    """A tiny noise floor never lowers the margin below min_delta."""
    assert noise_margin(0.0001, CONFIG) == pytest.approx(0.001)


def test_margin_scales_with_noise_and_shrinks_with_runs() -> None:
    """The margin is k * std, and k * std / sqrt(n) for a mean of n runs."""
    assert noise_margin(0.002, CONFIG) == pytest.approx(0.004)
    assert noise_margin(0.002, CONFIG, runs=2) == pytest.approx(0.004 / math.sqrt(2))


def test_clear_win_is_kept() -> None:
    """An improvement larger than the margin is kept."""
    verdict = judge(0.990, 1.000, 0.002, CONFIG)
    assert verdict.decision is Decision.KEEP
    assert verdict.improvement == pytest.approx(0.010)


def test_worse_candidate_is_discarded() -> None:
    """A candidate worse than the best is discarded."""
    assert judge(1.010, 1.000, 0.002, CONFIG).decision is Decision.DISCARD


def test_win_inside_noise_band_asks_for_confirmation() -> None:
    """A win below the single-run margin but above the two-run margin is confirmed by a re-run."""
    # margin 0.004, two-run margin 0.00283: an improvement of 0.0035 is a close call
    assert judge(0.9965, 1.000, 0.002, CONFIG).decision is Decision.CONFIRM


def test_tiny_win_is_discarded_without_confirmation() -> None:
    """A win smaller than even the two-run margin is not worth a re-run."""
    assert judge(0.9990, 1.000, 0.002, CONFIG).decision is Decision.DISCARD


def test_confirmation_disabled_discards_close_calls() -> None:
    """With confirm = false a close call is simply discarded."""
    config = JudgeConfig(k=2.0, min_delta=0.001, confirm=False)
    assert judge(0.9965, 1.000, 0.002, config).decision is Decision.DISCARD


def test_no_noise_floor_uses_min_delta_only() -> None:
    """With no noise measured (std 0) the margin is min_delta and there is no confirm band."""
    assert judge(0.9985, 1.000, 0.0, CONFIG).decision is Decision.KEEP
    assert judge(0.9995, 1.000, 0.0, CONFIG).decision is Decision.DISCARD


def test_confirmed_mean_that_still_wins_is_kept() -> None:
    """After a confirmation the mean of both runs is judged with the two-run margin."""
    assert judge_confirmed([0.9965, 0.9968], 1.000, 0.002, CONFIG).decision is Decision.KEEP


def test_confirmed_mean_that_regresses_is_discarded() -> None:
    """A lucky first run whose re-run regresses is discarded."""
    assert judge_confirmed([0.9965, 1.0005], 1.000, 0.002, CONFIG).decision is Decision.DISCARD


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_measurement_is_refused(bad: float) -> None:
    """A NaN or infinite val_bpb is a clear error, never a keep."""
    with pytest.raises(ValueError, match="finite"):
        judge(bad, 1.0, 0.001, CONFIG)


def test_confirm_without_measurements_is_refused() -> None:
    """judge_confirmed needs at least one measurement."""
    with pytest.raises(ValueError, match="at least one"):
        judge_confirmed([], 1.0, 0.001, CONFIG)
