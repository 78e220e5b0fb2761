"""The posterior keep rule: the effect prior fitted by EM (`daemon.research.prior`), the rule's error rate at a
known prior, and the evidence it reads from stored verdicts."""

from __future__ import annotations

import math
import random

import numpy as np

from daemon.config import JudgeConfig
from daemon.research.judge import Decision, Noise, decide
from daemon.research.measurements import judged_evidence
from daemon.research.prior import GRID, EffectPrior, Evidence
from tests.daemon.rows import row

# a known mixture on the grid: 70% no effect, 20% Normal(-1, 1) (harms), 10% Normal(1.5, 0.7) (gains)
MIXTURE = EffectPrior(0.7 * (GRID == 0.0) + 0.2 * np.exp(-0.5 * ((GRID + 1.0) / 1.0) ** 2) / np.exp(
    -0.5 * ((GRID + 1.0) / 1.0) ** 2).sum() + 0.1 * np.exp(-0.5 * ((GRID - 1.5) / 0.7) ** 2) / np.exp(
    -0.5 * ((GRID - 1.5) / 0.7) ** 2).sum())


def _draw(prior: EffectPrior, rng: random.Random) -> float:
    return float(rng.choices(GRID.tolist(), weights=prior.weights.tolist())[0])


def test_em_fit_recovers_a_known_mixture() -> None:
    """2000 estimates (standard errors 0.3..1 sigma) of effects drawn from a known mixture: the fitted prior's
    distribution function at -1, -0.5, 0.5, 1 and 2 sigma is the mixture's within 0.03, its mean within 0.1. (At
    the atom itself it is not: estimates this noisy spread the atom's mass over about +-0.2 sigma.)"""
    rng = random.Random(7)
    evidence = []
    for _ in range(2000):
        se = rng.uniform(0.3, 1.0)
        evidence.append(Evidence(_draw(MIXTURE, rng) + rng.gauss(0.0, se), se))
    fitted = EffectPrior.fit(evidence, strength=20.0)
    for threshold in (-1.0, -0.5, 0.5, 1.0, 2.0):
        assert abs(fitted.probability(threshold) - MIXTURE.probability(threshold)) < 0.03, threshold
    assert abs(fitted.mean() - MIXTURE.mean()) < 0.1


def test_a_fit_on_few_candidates_stays_near_the_default() -> None:
    """Three lucky +4 sigma estimates move the prior toward gains, but 20 pseudo-candidates of the default hold it."""
    fitted = EffectPrior.fit([Evidence(4.0, 1.0)] * 3, strength=20.0)
    default = EffectPrior.default()
    assert default.probability(2.0) > fitted.probability(2.0) > default.probability(2.0) - 3 / 23 - 0.01


def _posterior_trial(rng: random.Random, effect: float, config: JudgeConfig, prior: EffectPrior) -> bool:
    """One candidate of true effect `effect` (sigma) judged look by look against an incumbent of 3 runs."""
    incumbent = [1.0 + 0.01 * rng.gauss(0.0, 1.0) for _ in range(3)]
    runs: list[float] = []
    while True:
        runs.append(1.0 - 0.01 * effect + 0.01 * rng.gauss(0.0, 1.0))
        verdict = decide(runs, incumbent, Noise(0.01, 100_000), config, prior=prior)
        if verdict.decision is not Decision.CONFIRM:
            return verdict.decision is Decision.KEEP


def test_posterior_rule_holds_its_share_of_not_real_keeps_at_a_known_prior() -> None:
    """4000 candidates whose effects are drawn from the prior the rule uses: among the kept, the share with no real
    improvement (effect <= 0) is at most posterior_q (plus three standard errors)."""
    config = JudgeConfig(rule="posterior", posterior_q=0.1, posterior_futility=0.05, max_runs=4, keep_min_runs=1,
                         min_delta=0.0)
    rng = random.Random(11)
    kept_effects = []
    for _ in range(4000):
        effect = _draw(MIXTURE, rng)
        if _posterior_trial(rng, effect, config, MIXTURE):
            kept_effects.append(effect)
    share = sum(e <= 0 for e in kept_effects) / len(kept_effects)
    assert len(kept_effects) > 100
    assert share <= config.posterior_q + 3 * math.sqrt(config.posterior_q * (1 - config.posterior_q) / len(kept_effects))


def test_posterior_rule_keeps_a_clear_win_and_drops_a_clear_loss() -> None:
    """Under the default prior, two runs 5 sigma better are kept; one run 2 sigma worse is discarded as futile."""
    config = JudgeConfig(rule="posterior")
    noise, incumbent = Noise(0.01, 50), [1.0, 1.0, 1.0]
    win = decide([0.95, 0.95], incumbent, noise, config)
    assert (win.decision, win.rule) == (Decision.KEEP, "posterior") and win.p is not None and win.p <= 0.05
    loss = decide([1.02], incumbent, noise, config)
    assert (loss.decision, loss.rule) == (Decision.DISCARD, "futile")


def test_judged_evidence_reads_verdicts_in_sigma_by_group() -> None:
    """Each judged candidate's improvement and standard error, divided by its verdict's sigma; removals of code apart,
    queued or unjudged rows left out."""
    verdict = {"improvement": 0.02, "sigma": 0.01, "se": 0.005, "removes_code": False}
    rows = [row(1, "candidate", "kept", 0.98, verdict=verdict),
            row(2, "candidate", "discarded", 1.01, verdict={**verdict, "improvement": -0.01, "removes_code": True}),
            row(3, "candidate", "evaluating", 0.99, verdict=None), row(4, "remeasure", "measured", 0.99)]
    assert judged_evidence(rows) == [Evidence(2.0, 0.5)]
    assert judged_evidence(rows, removals=True) == [Evidence(-1.0, 0.5)]
