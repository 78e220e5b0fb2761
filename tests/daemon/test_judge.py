"""The keep rule (`daemon.research.judge`): worked examples, the t distribution, and its false-keep rate."""

from __future__ import annotations

import json
import math
import random

import pytest

from daemon.config import JudgeConfig
from daemon.research.judge import (
    ChangeSize,
    Decision,
    LegacyRule,
    Noise,
    decide,
    look_alpha,
    pooled_noise,
    t_quantile,
    t_sf,
)

CONFIG = JudgeConfig(max_runs=3, futility_t=0.5, min_delta=0.0005)
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
    """Three looks at 5% overall: each look at z = 1.992 (Pocock), one look at the full 5%."""
    assert look_alpha(JudgeConfig(max_runs=3)) == pytest.approx(0.5 * math.erfc(1.9921 / math.sqrt(2)), rel=2e-3)
    assert look_alpha(JudgeConfig(max_runs=3, confirm=False)) == pytest.approx(0.05)


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
    config = JudgeConfig(memory_soft_limit_mb=10_000, memory_gain_sigma_per_gb=0.5)
    under = decide([0.96], INCUMBENT, NOISE, config, peak_memory_mb=9_000)
    over = decide([0.96], INCUMBENT, NOISE, config, peak_memory_mb=10_000 + 4 * 1024)
    assert under.decision is Decision.KEEP
    assert over.decision is not Decision.KEEP and over.extra_gain == pytest.approx(0.02)


def test_simpler_change_within_noise_is_kept() -> None:
    """Removing code at an equal result (two runs, no worse) is kept; adding code at an equal result is not."""
    removal = ChangeSize(added=2, removed=12)
    assert decide([0.999, 1.0], INCUMBENT, NOISE, CONFIG, change=removal).rule == "simpler"
    assert decide([0.999, 1.0], INCUMBENT, NOISE, CONFIG, change=ChangeSize(12, 2)).decision is not Decision.KEEP


def test_simpler_change_that_is_worse_is_not_kept() -> None:
    """Removing code does not excuse a worse result."""
    verdict = decide([1.01, 1.012], INCUMBENT, NOISE, CONFIG, change=ChangeSize(0, 10))
    assert verdict.decision is not Decision.KEEP


def test_simpler_change_gets_a_second_run() -> None:
    """One run of a removal within noise is confirmed before the simplicity rule may keep it."""
    verdict = decide([1.005], INCUMBENT, NOISE, CONFIG, change=ChangeSize(0, 10))
    assert (verdict.decision, verdict.rule) == (Decision.CONFIRM, "simpler-close-call")


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
    """4000 no-effect changes judged sequentially with estimated noise: at most 5% kept; 3 sigma mostly kept."""
    config = JudgeConfig()
    rng = random.Random(20261130)
    null_keeps = sum(_sequential_trial(rng, 0.0, config) for _ in range(4000)) / 4000
    strong_keeps = sum(_sequential_trial(rng, 3.0, config) for _ in range(500)) / 500
    assert null_keeps <= config.false_keep_rate
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
