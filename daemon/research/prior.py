"""The distribution of candidate effects, learned from the line's own judged candidates (empirical Bayes).

The posterior keep rule (`JudgeConfig.rule = "posterior"`, `daemon.research.judge.decide`) asks, for a
candidate whose runs so far estimate its effect as `estimate` with standard error `se`: how likely is it
that the change is no real improvement (effect <= 0 sigma, or for a removal of code: below -margin)? That
probability (a local false discovery rate) needs a prior: how effects are spread over the line's changes.

`EffectPrior` is that prior on a grid of effects (in sigma, positive = better), Efron's g-modelling:
- `EffectPrior.default(center)`: the conservative prior the line starts from, chosen without any data (and
  never from the simulator's landscapes): centred on the boundary of the test's null (0 for a change, minus
  the simplicity margin for a removal of code), symmetric around it (without data, a change is as likely to
  be worth keeping as not), 80% of its mass within about a quarter sigma of it (most changes to a tuned
  training script do little), 20% spread as Normal(center, 2).
- `EffectPrior.fit(evidence, strength)`: the grid weights that maximize the likelihood of the judged
  candidates' estimates (each with its own standard error; EM, the deconvolution of Laird 1978), with
  `strength` pseudo-candidates drawn from the default prior (a Dirichlet prior on the weights), so that a
  line with few judged candidates stays close to the default and one with many follows its data.

The estimates come from sequential looks (a candidate is stopped early when it clearly loses or wins), but
the likelihood of a candidate's effect given its runs does not depend on that stopping rule, so the fit
uses each candidate's final estimate and standard error as they are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GRID = np.round(np.arange(-8.0, 8.0 + 1e-9, 0.1), 10)  # effects in sigma; 0 is a grid point
DEFAULT_NULL_SHARE = 0.8
DEFAULT_NULL_SD = 0.1
DEFAULT_SLAB_SD = 2.0
EM_ITERATIONS = 150


@dataclass(frozen=True)
class Evidence:
    """One judged candidate: its effect's estimate and that estimate's standard error, both in sigma."""

    estimate: float
    se: float


class EffectPrior:
    """A distribution of effects (in sigma) on `GRID`; see the module docstring."""

    def __init__(self, weights: np.ndarray) -> None:
        if weights.shape != GRID.shape or not np.all(weights >= 0) or not weights.sum() > 0:
            raise ValueError("an effect prior needs one non-negative weight per grid point")
        self.weights = weights / weights.sum()

    @classmethod
    def default(cls, center: float = 0.0) -> EffectPrior:
        return cls(_default_weights(center))

    @classmethod
    def fit(cls, evidence: Sequence[Evidence], strength: float = 20.0, center: float = 0.0) -> EffectPrior:
        """The maximum a posteriori grid weights given the candidates' estimates (EM), shrunk toward the default
        prior (centred on `center`) by `strength` pseudo-candidates. Remembered: each look of a candidate
        judges on the same line history."""
        return cls(_em_weights(tuple(evidence), strength, center))

    def probability(self, below: float) -> float:
        """Prior P(effect <= below)."""
        return float(self.weights[below + 1e-9 >= GRID].sum())

    def mean(self) -> float:
        return float(np.dot(self.weights, GRID))

    def posterior_at_most(self, threshold: float, estimate: float, se: float, df: int | None = None) -> float:
        """P(effect <= threshold | an estimate with this standard error); Student's t likelihood with `df`
        degrees of freedom when the noise was estimated on few of them (None: normal)."""
        if not (math.isfinite(estimate) and math.isfinite(se) and se > 0):
            raise ValueError(f"an estimate needs a finite value and a positive standard error, got {estimate}, {se}")
        z = (estimate - GRID) / se
        if df is None or df > 1000:
            log_like = -0.5 * z ** 2
        else:
            log_like = -0.5 * (df + 1) * np.log1p(z ** 2 / df)
        joint = self.weights * np.exp(log_like - log_like.max())
        return float(joint[threshold + 1e-9 >= GRID].sum() / joint.sum())


@functools.lru_cache(maxsize=16)
def _em_weights(evidence: tuple[Evidence, ...], strength: float, center: float) -> np.ndarray:
    """`EffectPrior.fit`'s grid weights (remembered: each look of a candidate judges on the same history)."""
    base = _default_weights(center)
    usable = [e for e in evidence if math.isfinite(e.estimate) and math.isfinite(e.se) and e.se > 0]
    if not usable:
        return base
    estimates = np.array([e.estimate for e in usable])[:, None]
    ses = np.array([e.se for e in usable])[:, None]
    likelihood = np.exp(-0.5 * ((estimates - GRID[None, :]) / ses) ** 2) / ses  # n x grid (constants cancel)
    likelihood += 1e-300
    weights, pseudo, n = base.copy(), strength * base, len(usable)
    for _ in range(EM_ITERATIONS):
        joint = likelihood * weights[None, :]
        responsibility = joint / joint.sum(axis=1, keepdims=True)
        weights = (responsibility.sum(axis=0) + pseudo) / (n + strength)
    return weights


def _default_weights(center: float = 0.0) -> np.ndarray:
    spike = np.exp(-0.5 * ((GRID - center) / DEFAULT_NULL_SD) ** 2)
    slab = np.exp(-0.5 * ((GRID - center) / DEFAULT_SLAB_SD) ** 2)
    weights: np.ndarray = DEFAULT_NULL_SHARE * spike / spike.sum() + (1 - DEFAULT_NULL_SHARE) * slab / slab.sum()
    return weights
