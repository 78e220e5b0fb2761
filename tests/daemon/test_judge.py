"""The keep rule (`daemon.research.judge`): worked examples, the t distribution, and its false-keep rate."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from daemon.config import JudgeConfig
from daemon.research import judge as judge_module
from daemon.research.judge import (
    ChangeSize,
    Decision,
    LegacyRule,
    Noise,
    Pairs,
    decide,
    look_alpha,
    paired_noise,
    pairing_pays,
    pooled_noise,
    seed_share,
    simplicity_level,
    t_quantile,
    t_sf,
)

POCOCK_5 = {"false_keep_rate": 0.05, "boundary_shape": 0.5}  # the worked examples' boundary: Pocock's, 5%
CONFIG = JudgeConfig(max_runs=3, futility_t=0.5, min_delta=0.0005, keep_min_runs=1, **POCOCK_5)
NOISE = Noise(sigma=0.01, df=20)
INCUMBENT = [1.0, 1.0, 1.0]  # mean 1.0 over 3 runs


def test_pooled_noise_worked_example() -> None:
    """Sigma pools squared deviations of every group over the sum of (n - 1)."""
    noise = pooled_noise([[1.0, 1.02, 0.98], [0.5, 0.52], [0.7]])
    assert noise.df == 3
    assert noise.sigma == pytest.approx(math.sqrt((0.0008 + 0.0002) / 3))


def test_pooled_noise_without_repeats_is_unmeasured() -> None:
    """Single runs carry no noise information: df 0, sigma 0."""
    assert pooled_noise([[1.0], [0.9]]) == Noise(0.0, 0)


def test_t_distribution_matches_tables() -> None:
    """Student's t: the 97.5% quantile at df 10 is 2.228, at df 2 the 95% one is 2.920; t = 0 is the median."""
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-3)
    assert t_quantile(0.95, 2) == pytest.approx(2.9200, abs=1e-3)
    assert t_sf(0.0, 5) == pytest.approx(0.5)
    assert t_sf(-1.0, 7) == pytest.approx(1 - t_sf(1.0, 7))


def test_look_alpha_is_pococks_boundary() -> None:
    """Three looks that may each keep, 5% overall: each look at z = 1.992 (Pocock), one look at the full 5%."""
    pocock = JudgeConfig(max_runs=3, keep_min_runs=1, false_keep_rate=0.05, boundary_shape=0.5)
    assert look_alpha(pocock) == pytest.approx(0.5 * math.erfc(1.9921 / math.sqrt(2)), rel=2e-3)
    assert look_alpha(JudgeConfig(max_runs=3, confirm=False, false_keep_rate=0.05)) == pytest.approx(0.05)


@pytest.mark.parametrize(("alpha", "looks", "first", "shape"), [
    (0.05, 5, 2, 0.5), (0.05, 5, 2, 0.0), (0.01, 8, 2, 0.25), (0.02, 6, 3, 0.0), (0.05, 4, 1, 0.25)])
def test_boundary_spends_exactly_its_rate_over_the_keep_looks(alpha: float, looks: int, first: int,
                                                              shape: float) -> None:
    """A Gaussian random walk crosses the boundary at one of the looks first..K with chance alpha (no less)."""
    levels = judge_module._boundary_levels(alpha, looks, first, shape)
    bounds = np.array([t_quantile(1.0 - level, 10**6) for level in levels])
    walks = np.random.default_rng(7).standard_normal((200_000, looks)).cumsum(axis=1) / np.sqrt(np.arange(1, looks + 1))
    rate = float((walks[:, first - 1:] >= bounds[first - 1:]).any(axis=1).mean())
    assert abs(rate - alpha) <= 4 * math.sqrt(alpha * (1 - alpha) / 200_000), rate


def test_looks_before_keep_min_runs_spend_nothing() -> None:
    """With keep_min_runs 2, look 1 cannot keep: the rate is spent on looks 2..K (a lower bar than over all K)."""
    keep_looks, all_looks = JudgeConfig(keep_min_runs=2), JudgeConfig(keep_min_runs=2, boundary_looks="all")
    assert look_alpha(keep_looks, 2) > look_alpha(all_looks, 2)
    assert look_alpha(keep_looks, 1) == look_alpha(keep_looks, 2)  # look 1 shows what a keep would need
    assert look_alpha(JudgeConfig(keep_min_runs=1), 1) == pytest.approx(look_alpha(all_looks, 1))


def test_obrien_fleming_shape_is_strict_early_and_lenient_late() -> None:
    """Shape 0: the level rises look by look and the last look is less strict than Pocock's constant level."""
    pocock, obf = JudgeConfig(max_runs=6, boundary_shape=0.5), JudgeConfig(max_runs=6, boundary_shape=0.0)
    levels = [look_alpha(obf, k) for k in range(2, 7)]
    assert levels == sorted(levels) and levels[0] < levels[-1]
    assert len({round(look_alpha(pocock, k), 12) for k in range(2, 7)}) == 1
    assert look_alpha(obf, 6) > look_alpha(pocock, 6) > look_alpha(obf, 2)


def test_clear_win_is_kept_at_the_first_look() -> None:
    """A 5 sigma win is kept after one run, with its numbers."""
    verdict = decide([0.95], INCUMBENT, NOISE, CONFIG)
    assert verdict.decision is Decision.KEEP and verdict.rule == "significant"
    assert verdict.improvement == pytest.approx(0.05)
    assert verdict.t == pytest.approx(0.05 / (0.01 * math.sqrt(1 + 1 / 3)))
    assert verdict.p is not None and verdict.alpha is not None and verdict.p < verdict.alpha


def test_close_call_is_confirmed() -> None:
    """A 1.7 sigma win after one run is neither kept nor dropped: one more seed."""
    verdict = decide([0.98], INCUMBENT, NOISE, CONFIG)
    assert verdict.decision is Decision.CONFIRM
    assert verdict.margin > 0.02


def test_clear_loss_stops_early() -> None:
    """No win at all (t below futility_t) is discarded without a confirmation."""
    verdict = decide([1.0], INCUMBENT, NOISE, CONFIG)
    assert (verdict.decision, verdict.rule) == (Decision.DISCARD, "futile")


def test_mean_of_several_runs_decides() -> None:
    """Three runs averaging a 2.5 sigma win are kept, though no single one would be."""
    assert decide([0.98], INCUMBENT, NOISE, CONFIG).decision is Decision.CONFIRM
    verdict = decide([0.98, 0.97, 0.975], INCUMBENT, NOISE, CONFIG)
    assert verdict.decision is Decision.KEEP and verdict.n == 3


def test_runs_exhausted_discards() -> None:
    """At max_runs a still-unproven win is discarded."""
    verdict = decide([0.99, 0.99, 0.99], INCUMBENT, NOISE, CONFIG)
    assert (verdict.decision, verdict.rule) == (Decision.DISCARD, "runs-exhausted")


def test_no_noise_estimate_falls_back_to_min_delta() -> None:
    """Before any repeat was measured only min_delta decides."""
    unmeasured = Noise(0.0, 0)
    assert decide([0.999], [1.0], unmeasured, CONFIG).decision is Decision.KEEP
    assert decide([0.9999], [1.0], unmeasured, CONFIG).decision is Decision.DISCARD


def test_a_large_change_must_win_more() -> None:
    """40 added lines need one sigma more: a 3 sigma win kept when small is a close call when large."""
    small = decide([0.97], INCUMBENT, NOISE, CONFIG, change=ChangeSize(3, 1))
    large = decide([0.97], INCUMBENT, NOISE, CONFIG, change=ChangeSize(41, 1))
    assert small.decision is Decision.KEEP
    assert large.decision is Decision.CONFIRM and large.extra_gain == pytest.approx(0.01)


def test_memory_over_the_soft_limit_costs_gain() -> None:
    """Peak memory 4 GB over the soft limit needs 2 sigma more (0.5 sigma per GB)."""
    config = JudgeConfig(memory_soft_limit_mb=10_000, memory_gain_sigma_per_gb=0.5, keep_min_runs=1, **POCOCK_5)
    under = decide([0.96], INCUMBENT, NOISE, config, peak_memory_mb=9_000)
    over = decide([0.96], INCUMBENT, NOISE, config, peak_memory_mb=10_000 + 4 * 1024)
    assert under.decision is Decision.KEEP
    assert over.decision is not Decision.KEEP and over.extra_gain == pytest.approx(0.02)


def test_simpler_change_passes_the_non_inferiority_test() -> None:
    """A removal is kept as simpler when its lower confidence bound clears minus the margin; an addition with the
    same numbers is not."""
    config = JudgeConfig(max_runs=3, simplicity_margin_sigma=2.0, simplicity_alpha=0.05)
    removal = ChangeSize(added=2, removed=12)
    assert decide([1.0, 1.0, 1.0], INCUMBENT, NOISE, config, change=removal).rule == "simpler"
    assert decide([1.0, 1.0, 1.0], INCUMBENT, NOISE, config, change=ChangeSize(12, 2)).decision is not Decision.KEEP


def test_simpler_change_needs_evidence_not_just_an_equal_mean() -> None:
    """Two runs at an equal mean do not show that a removal costs less than the margin: no keep."""
    verdict = decide([0.999, 1.0], INCUMBENT, NOISE, CONFIG, change=ChangeSize(2, 12))
    assert verdict.decision is not Decision.KEEP


def test_simpler_change_that_is_worse_is_not_kept() -> None:
    """Removing code does not excuse a worse result."""
    verdict = decide([1.01, 1.012], INCUMBENT, NOISE, CONFIG, change=ChangeSize(0, 10))
    assert verdict.decision is not Decision.KEEP


def test_simpler_change_gets_another_run() -> None:
    """One promising run of a removal is confirmed before the simplicity test may keep it."""
    verdict = decide([0.995], INCUMBENT, NOISE, CONFIG, change=ChangeSize(0, 10))
    assert (verdict.decision, verdict.rule) == (Decision.CONFIRM, "simpler-close-call")


def test_point_rule_without_alpha_keeps_an_equal_mean() -> None:
    """simplicity_alpha unset is the rule before the test: two runs no worse than the margin are kept."""
    config = JudgeConfig(max_runs=3, simplicity_alpha=None, simplicity_margin_sigma=0.0)
    assert decide([0.999, 1.0], INCUMBENT, NOISE, config, change=ChangeSize(2, 12)).rule == "simpler"


@pytest.mark.parametrize("alpha", [0.05, 0.10])
def test_simplicity_error_rate_holds_at_the_margin(alpha: float) -> None:
    """A removal that truly costs exactly the margin is kept, over all its looks, at most simplicity_alpha of
    the time (sequential looks with confirmations, noise known on many degrees of freedom)."""
    config = JudgeConfig(max_runs=4, futility_t=0.0, simplicity_margin_sigma=0.5, simplicity_alpha=alpha)
    rng = random.Random(11)
    incumbent = [1.0] * 8
    noise = Noise(0.01, 200)
    trials, kept = 4000, 0
    for _ in range(trials):
        runs: list[float] = []
        while True:
            runs.append(1.0 + 0.005 + rng.gauss(0.0, 0.01))
            verdict = decide(runs, incumbent, noise, config, change=ChangeSize(0, 3))
            if verdict.decision is not Decision.CONFIRM:
                kept += verdict.decision is Decision.KEEP
                break
    rate = kept / trials
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials), rate
    assert simplicity_level(config) < alpha  # the per-look level is spent over the looks


def test_paired_test_cancels_the_seed_share() -> None:
    """Looks paired by seed with the incumbent's runs: the shared seed term cancels and a steady win is kept that
    the unpaired test cannot tell from noise."""
    incumbent = [1.00, 1.02, 0.98]
    candidate = [0.99, 1.01, 0.97]
    noise = Noise(0.02, 20)
    pairs = Pairs((0.01, 0.01, 0.01), Noise(0.004, 12))
    unpaired = decide(candidate, incumbent, noise, CONFIG)
    paired = decide(candidate, incumbent, noise, CONFIG, pairs=pairs)
    assert unpaired.decision is not Decision.KEEP and not unpaired.paired
    assert paired.decision is Decision.KEEP and paired.paired and paired.df == 12


@pytest.mark.parametrize("why, pairs", [
    ("a look without a partner", Pairs((0.01, 0.01), Noise(0.004, 12))),
    ("paired noise on too few degrees of freedom", Pairs((0.01, 0.01, 0.01), Noise(0.004, 2))),
    ("no seed share (paired sigma = sqrt(2) sigma)", Pairs((0.01, 0.01, 0.01), Noise(0.0283, 12))),
])
def test_pairing_falls_back_to_the_unpaired_test(why: str, pairs: Pairs) -> None:
    """Broken, unmeasured or useless pairing: the verdict is the unpaired one."""
    candidate, incumbent, noise = [0.99, 1.01, 0.97], [1.00, 1.02, 0.98], Noise(0.02, 20)
    verdict = decide(candidate, incumbent, noise, CONFIG, pairs=pairs)
    assert not verdict.paired, why
    assert verdict.t == decide(candidate, incumbent, noise, CONFIG).t


def test_pairing_off_ignores_the_pairs() -> None:
    """paired = false: the pairs are not used, however good."""
    config = JudgeConfig(max_runs=3, paired=False)
    verdict = decide([0.99], [1.0], Noise(0.02, 20), config, pairs=Pairs((0.01,), Noise(0.001, 30)))
    assert not verdict.paired


def test_pairing_pays_only_with_confidence() -> None:
    """The paired test is used where its variance is clearly below the unpaired one, not on a noisy estimate."""
    single = Noise(0.01, 40)
    assert pairing_pays(single, Noise(0.006, 40), n=2, n_incumbent=3)  # seed share 82%
    assert not pairing_pays(single, Noise(0.0135, 40), n=2, n_incumbent=3)  # share 9%: not clearly better
    assert not pairing_pays(single, Noise(0.006, 1), n=2, n_incumbent=3)  # one degree of freedom


def test_seed_share_and_paired_noise_from_groups() -> None:
    """The paired noise pools within candidates (their own effects cancel); the seed share follows from it."""
    paired = paired_noise([[0.01, 0.03], [-0.5, -0.48, -0.52]])
    assert paired.df == 3
    assert paired.sigma == pytest.approx(math.sqrt((0.0002 + 0.0008) / 3))
    assert seed_share(Noise(paired.sigma, 10), paired) == pytest.approx(0.5)
    assert seed_share(Noise(0.01, 0), paired) is None


def test_paired_false_keep_rate_is_below_target() -> None:
    """No-effect candidates judged sequentially on seed-paired looks (seed share 50%, noise and paired noise
    estimated from simulated earlier runs) are kept at most false_keep_rate of the time."""
    config = JudgeConfig(max_runs=3, futility_t=0.5, min_delta=0.0, paired_min_df=4)
    rng = random.Random(5)
    trials, kept = 3000, 0
    for _ in range(trials):
        seeds = [rng.gauss(0.0, math.sqrt(0.5)) for _ in range(3)]
        incumbent = [1.0 + 0.01 * (s + math.sqrt(0.5) * rng.gauss(0.0, 1.0)) for s in seeds]
        earlier = [[0.01 * math.sqrt(0.5) * (rng.gauss(0.0, 1.0) - rng.gauss(0.0, 1.0)) for _ in range(2)]
                   for _ in range(8)]
        noise = pooled_noise([incumbent, [1.0 + 0.01 * rng.gauss(0.0, 1.0) for _ in range(6)]])
        runs: list[float] = []
        while True:
            look = len(runs)
            runs.append(1.0 + 0.01 * (seeds[look] + math.sqrt(0.5) * rng.gauss(0.0, 1.0)))
            diffs = tuple(i - c for i, c in zip(incumbent, runs, strict=False))
            verdict = decide(runs, incumbent, noise, config, pairs=Pairs(diffs, paired_noise([*earlier, diffs])))
            if verdict.decision is not Decision.CONFIRM:
                kept += verdict.decision is Decision.KEEP
                break
    rate = kept / trials
    assert rate <= config.false_keep_rate + 3 * math.sqrt(0.05 * 0.95 / trials), rate


def test_change_size_counts_diff_lines() -> None:
    """Added and removed lines of a unified diff, headers and blank lines excluded."""
    diff = "--- a/train.py\n+++ b/train.py\n@@ -1,3 +1,3 @@\n x = 1\n-y = 2\n+y = 3\n+z = 4\n+\n"
    assert ChangeSize.of_diff(diff) == ChangeSize(added=2, removed=1)


def test_verdict_record_is_json_with_its_numbers() -> None:
    """The stored verdict holds decision, rule, margin, sigma, df, n, t, p and alpha."""
    record = decide([0.95], INCUMBENT, NOISE, CONFIG).as_record()
    assert json.loads(json.dumps(record)) == record
    assert record["decision"] == "keep"
    assert {"margin", "sigma", "df", "n", "n_incumbent", "t", "p", "alpha", "reason"} <= set(record)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_measurement_is_refused(bad: float) -> None:
    """A NaN or infinite val_bpb is a clear error, never a keep."""
    with pytest.raises(ValueError, match="finite"):
        decide([bad], INCUMBENT, NOISE, CONFIG)


def test_decide_without_runs_is_refused() -> None:
    """decide needs at least one run on each side."""
    with pytest.raises(ValueError, match="at least one run"):
        decide([], INCUMBENT, NOISE, CONFIG)


def test_legacy_rule_keeps_its_old_margin() -> None:
    """The replaced rule (bench only): k * std on one run, a confirm band down to the two-run margin."""
    config = JudgeConfig(k=2.0, min_delta=0.001)
    assert LegacyRule.first_look(0.990, 1.0, 0.002, config) is Decision.KEEP
    assert LegacyRule.first_look(0.9965, 1.0, 0.002, config) is Decision.CONFIRM
    assert LegacyRule.confirmed([0.9965, 1.0005], 1.0, 0.002, config) is Decision.DISCARD


def _sequential_trial(rng: random.Random, gain: float, config: JudgeConfig) -> bool:
    """One candidate judged look by look, as the session does: baseline with 2 noise runs, pooled noise."""
    incumbent = [rng.gauss(0.0, 1.0) for _ in range(3)]
    others = [[rng.gauss(0.0, 1.0) for _ in range(2)] for _ in range(rng.randrange(0, 8))]
    runs: list[float] = []
    for _ in range(config.max_runs):
        runs.append(rng.gauss(-gain, 1.0))
        verdict = decide(runs, incumbent, pooled_noise([incumbent, runs, *others]), config)
        if verdict.decision is not Decision.CONFIRM:
            return verdict.decision is Decision.KEEP
    raise AssertionError("the rule confirmed past max_runs")


def test_false_keep_rate_is_below_target_on_a_fixed_seed_simulation() -> None:
    """8000 no-effect changes judged sequentially with estimated noise under the defaults: at most false_keep_rate
    kept (up to the simulation's own error: the boundary spends the rate exactly); 3 sigma mostly kept."""
    config = JudgeConfig()
    rng = random.Random(20261130)
    trials = 8000
    null_keeps = sum(_sequential_trial(rng, 0.0, config) for _ in range(trials)) / trials
    strong_keeps = sum(_sequential_trial(rng, 3.0, config) for _ in range(500)) / 500
    rate = config.false_keep_rate
    assert null_keeps <= rate + 3 * math.sqrt(rate * (1 - rate) / trials), null_keeps
    assert strong_keeps >= 0.5


PARENT = '''"""Train a model."""

# learning rate
LR = 0.04


def step(x):
    """One step."""
    y = x * LR
    return y
'''


@pytest.mark.parametrize(("why", "child"), [
    ("comments and blank lines deleted", PARENT.replace("# learning rate\n", "").replace("\n\n\n", "\n")),
    ("docstrings deleted", PARENT.replace('"""Train a model."""\n', "").replace('    """One step."""\n', "")),
    ("lines joined", PARENT.replace("    y = x * LR\n    return y\n", "    y = x * LR; return y\n")),
])
def test_deleting_non_code_is_not_simpler_code(why: str, child: str) -> None:
    """Gaming the simplicity rule: removing comments, docstrings or line breaks removes no code line."""
    change = ChangeSize.between(PARENT, child)
    assert change.net == 0, why
    assert decide([1.0, 1.0], INCUMBENT, NOISE, CONFIG, change=change).rule != "simpler"


def test_removing_a_statement_is_simpler_code() -> None:
    """A real removal counts: one code line fewer."""
    child = PARENT.replace("    y = x * LR\n    return y\n", "    return x * LR\n")
    assert ChangeSize.between(PARENT, child) == ChangeSize(added=1, removed=2)


def test_unparsable_sources_fall_back_to_text_lines() -> None:
    """A source that does not parse is counted on its text lines."""
    assert ChangeSize.between("a = (\n", "a = (\nb\n") == ChangeSize(added=1, removed=0)


def test_a_first_run_win_is_confirmed_when_a_keep_needs_two_runs() -> None:
    """keep_min_runs = 2: a first run past the boundary is confirmed, and kept once two runs clear it."""
    config = JudgeConfig(max_runs=3, keep_min_runs=2, **POCOCK_5)
    first = decide([0.95], INCUMBENT, NOISE, config)
    assert (first.decision, first.rule) == (Decision.CONFIRM, "confirm-before-keep")
    assert decide([0.95, 0.955], INCUMBENT, NOISE, config).decision is Decision.KEEP
    assert decide([0.95], INCUMBENT, NOISE, JudgeConfig(max_runs=3, keep_min_runs=1, **POCOCK_5)).decision \
        is Decision.KEEP
