"""bench/screen_transfer.py: its edits apply to the real train.py, and its analysis over made-up raw values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import screen_transfer as st

TRAIN_PY = Path(__file__).resolve().parents[2] / "trainer" / "train.py"


def test_every_change_applies_exactly_once_to_the_baseline() -> None:
    """Each edit's `old` text occurs once in train.py and the edit changes the source (the slow one does not)."""
    source = TRAIN_PY.read_text()
    for change in st.CHANGES:
        edited = st.apply_change(source, change)
        assert (edited == source) == (change.old == ""), change.name
        compile(edited, change.name, "exec")
    assert sum(c.step_factor != 1.0 for c in st.CHANGES) == 1


def test_a_missing_or_repeated_old_text_fails_loudly() -> None:
    with pytest.raises(ValueError, match="occurs 0 times"):
        st.apply_change("a = 1\n", st.Change("x", "b = 1", "b = 2"))
    with pytest.raises(ValueError, match="occurs 2 times"):
        st.apply_change("a = 1\na = 1\n", st.Change("x", "a = 1", "a = 2"))


def raw_from(effects: dict[str, tuple[float, float]], noise: dict[int, float], base: float = 2.0) -> st.Raw:
    """val_bpb per source/budget/seed: base - effect (+ a seed offset shared by every source: paired noise only
    in the sd of one source, none in the paired differences)."""
    raw: st.Raw = {st.BASELINE: {st.FULL: {s: base + n for s, n in noise.items()},
                                 st.SHORT: {s: base + 1 + 2 * n for s, n in noise.items()}}}
    for name, (short, full) in effects.items():
        raw[name] = {st.FULL: {s: base - full + n for s, n in noise.items()},
                     st.SHORT: {s: base + 1 - short + 2 * n for s, n in noise.items()}}
    return raw


def test_pooled_sd_and_effects_in_full_sigma() -> None:
    """Two seeds at -+0.01: sigma_full 0.01*sqrt(2), sigma_short twice that; effects are divided by sigma_full;
    a seed offset shared by every source leaves no screen noise and, with short = full, perfect transfer."""
    noise = {0: -0.01, 1: 0.01}
    effects = {f"c{i}": (0.01 * i, 0.01 * i) for i in range(-2, 3)} | {st.SLOW: (-0.03, -0.01)}
    result = st.analyse(raw_from(effects, noise))
    sigma = 0.01 * math.sqrt(2)
    assert result["sigma_full"] == pytest.approx(sigma)
    assert result["sigma_short_over_full"] == pytest.approx(2.0)
    assert result["screen_noise"] == pytest.approx(0.0, abs=1e-9)
    table = result["changes"]
    assert table["c2"]["effect_full"] == pytest.approx(0.02 / sigma)
    assert result["correlation"] == pytest.approx(1.0)
    assert result["slope_full_on_short"] == pytest.approx(1.0)
    assert result["transfer"]["transfer_sd"] == pytest.approx(0.0, abs=1e-9)
    assert result["slow_penalty"] == pytest.approx(-0.02 / sigma)  # the short run penalised the slow one more
    assert result["edits"] == 5


def test_short_effects_on_a_smaller_scale_show_in_the_slope_not_in_the_rescaled_transfer() -> None:
    """Short effects at half the full ones: slope full on short 2, short on full 0.5; the raw residuals are
    half the effects, the rescaled ones vanish."""
    effects = {f"c{i}": (0.005 * i, 0.01 * i) for i in range(-3, 4)}
    result = st.analyse(raw_from(effects, {0: -0.01, 1: 0.01}))
    assert result["slope_full_on_short"] == pytest.approx(2.0)
    assert result["slope_short_on_full"] == pytest.approx(0.5)
    assert result["transfer"]["transfer_sd"] > 0.5
    assert result["transfer_rescaled"]["transfer_sd"] == pytest.approx(0.0, abs=1e-9)
    assert "slow_penalty" not in result


def test_seed_noise_in_the_differences_is_the_screen_noise_and_is_taken_out_of_transfer() -> None:
    """A change whose short value moves by +-d with the seed (the baseline's does not): the pooled paired sd is
    d*sqrt(2) over the changes that have it; transfer's noise part is noise^2 / seeds."""
    noise = {0: -0.01, 1: 0.01}
    effects = {f"c{i}": (0.01 * i, 0.01 * i) for i in range(4)}
    raw = raw_from(effects, noise)
    for name in effects:
        raw[name][st.SHORT][0] += 0.005
        raw[name][st.SHORT][1] -= 0.005
    result = st.analyse(raw)
    sigma = 0.01 * math.sqrt(2)
    assert result["screen_noise"] == pytest.approx(0.005 * math.sqrt(2) / sigma)
    assert result["full_paired_noise"] == pytest.approx(0.0, abs=1e-9)
    assert result["transfer"]["noise_sd"] == pytest.approx(result["screen_noise"] / math.sqrt(2))
    # every change's mean is unchanged: residuals 0, so the noise floors transfer at 0
    assert result["transfer"]["transfer_sd"] == 0.0


def test_transfer_interval_brackets_the_estimate() -> None:
    fit = st.transfer_fit([0.3, -0.5, 0.9, -0.1, 0.4, -0.8, 0.2, 0.0], noise_var=0.05)
    assert fit["transfer_sd_90_low"] < fit["transfer_sd"] < fit["transfer_sd_90_high"]
    assert fit["transfer_sd"] == pytest.approx(math.sqrt(fit["residual_sd"] ** 2 - 0.05))
    assert st.chi2_quantile(0.5, 7) == pytest.approx(6.346, abs=0.02)
