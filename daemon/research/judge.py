"""The noise-aware keep rule: is a measured val_bpb a real improvement over the best, or noise?

Training runs are noisy (seed, data order, timing jitter inside a wall-clock budget), so "lower than
the best" is not enough: a candidate is kept only when it wins by more than the noise margin
`max(min_delta, k * std)`, where `std` is the spread of the baseline repeated with other seeds.
A candidate that wins by less than the margin but more than the margin of a two-run mean (a close
call) is re-run once with another seed; the mean of the runs has a smaller noise (`std / sqrt(n)`),
and the candidate is kept only if that mean still beats the best by the margin for `n` runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from daemon.config import JudgeConfig


class Decision(str, Enum):
    KEEP = "keep"
    DISCARD = "discard"
    CONFIRM = "confirm"  # a close call: re-run with another seed, then judge the mean


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    improvement: float  # best - candidate (positive = better; val_bpb is lower-is-better)
    margin: float  # what the improvement had to exceed
    reason: str


def noise_margin(noise_std: float, config: JudgeConfig, runs: int = 1) -> float:
    """The improvement a mean of `runs` measurements must exceed to count as real."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    return max(config.min_delta, config.k * noise_std / math.sqrt(runs))


def judge(candidate_bpb: float, best_bpb: float, noise_std: float, config: JudgeConfig) -> Verdict:
    """Judge a single measurement against the best: keep, discard, or confirm with a re-run."""
    _check_number("candidate val_bpb", candidate_bpb)
    _check_number("best val_bpb", best_bpb)
    margin = noise_margin(noise_std, config)
    improvement = best_bpb - candidate_bpb
    if improvement > margin:
        return Verdict(Decision.KEEP, improvement, margin, f"beats the best by {improvement:.6f} > margin {margin:.6f}")
    # A close call is worth a re-run only when this run already clears the smaller margin of a two-run
    # mean: below that, the expected mean would fail anyway and the GPU time is better spent elsewhere.
    if config.confirm and improvement > noise_margin(noise_std, config, runs=2):
        return Verdict(Decision.CONFIRM, improvement, margin,
                       f"wins by {improvement:.6f}, within the noise margin {margin:.6f}: confirm with another seed")
    return Verdict(Decision.DISCARD, improvement, margin,
                   f"improvement {improvement:.6f} does not exceed the noise margin {margin:.6f}")


def judge_confirmed(measurements: list[float], best_bpb: float, noise_std: float, config: JudgeConfig) -> Verdict:
    """Judge the mean of a candidate's runs (first run + confirmations): keep or discard, never confirm again."""
    if not measurements:
        raise ValueError("judge_confirmed needs at least one measurement")
    for value in measurements:
        _check_number("candidate val_bpb", value)
    _check_number("best val_bpb", best_bpb)
    mean = sum(measurements) / len(measurements)
    margin = noise_margin(noise_std, config, runs=len(measurements))
    improvement = best_bpb - mean
    if improvement > margin:
        return Verdict(Decision.KEEP, improvement, margin,
                       f"mean of {len(measurements)} runs beats the best by {improvement:.6f} > margin {margin:.6f}")
    return Verdict(Decision.DISCARD, improvement, margin,
                   f"mean of {len(measurements)} runs wins by {improvement:.6f}, not more than margin {margin:.6f}")


def _check_number(what: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
