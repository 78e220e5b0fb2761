"""The keep rule: is a candidate's val_bpb a real improvement over the incumbent, or noise?

The rule (`decide`) is a sequential one-sided test on means:
- Noise is one sigma for every source, pooled from every repeat of the night (baseline and noise runs,
  confirmations, re-measures of the incumbent): `pooled_noise`. Its degrees of freedom grow as the night
  goes, and the test uses Student's t with them, so an early sigma from three runs is not trusted like a
  late one from thirty.
- The candidate's mean over its runs is compared with the incumbent's mean over its runs:
  t = (incumbent mean - candidate mean) / (sigma * sqrt(1/n_c + 1/n_i)).
- Each run of the candidate is a look. Look k has a nominal level from a group-sequential boundary over the
  looks at which a keep can happen (`look_alpha`: Wang-Tsiatis, `boundary_shape` from Pocock's constant level
  to O'Brien-Fleming's, strict early and lenient late), so that a change with no effect is kept at one of its
  looks with chance `false_keep_rate` at most. Keep as soon as the one-sided p-value is below that level;
  discard as soon as t falls below `futility_t` (a clear loss: no run is spent on it, and the false-keep
  rate only drops); else confirm with another seed, up to `max_runs`.
- A change that adds many lines (`large_change_lines`) must also win by `large_change_gain_sigma` sigma,
  and one whose peak memory is over `memory_soft_limit_mb` by `memory_gain_sigma_per_gb` sigma per GB:
  the test is then on the improvement minus that extra gain. (Peak memory is what train.py prints in its
  summary: the candidate's own word, not a trusted measurement; the sandbox's memory cap is the hard limit.)
- Seed pairing (`Pairs`): look k of a candidate runs under the seed of the incumbent's k-th fresh run
  (`daemon.research.planner.look_seed`), so the seed's share of the noise is common to both and cancels in
  their difference. The noise of one difference is pooled within candidates over the differences stored
  with earlier verdicts (`paired_noise`); the seed share follows (`seed_share`). The paired test is used
  when every look has a partner, the paired noise has `paired_min_df` degrees of freedom and it clearly
  beats the unpaired test (`pairing_pays`); else the unpaired test above (the fallback).
- `keep_min_runs`: a keep needs this many runs of the candidate (a first run that clears the boundary is
  confirmed first: a lucky run, or a change noisier than the pooled sigma, rarely clears it twice).
- `min_gain_sigma`: every change must win by this many sigma (the test is on improvement minus it), so a
  change with no effect needs a lucky overshoot to be kept, not just luck.
- Simplicity: a change that removes more code lines than it adds is kept when a non-inferiority test shows
  it is not worse than the incumbent by `simplicity_margin_sigma` sigma or more, at `simplicity_alpha`
  spent over the looks like the keep test (a removal that truly costs the margin is kept with that chance
  at most). Lines are counted on the normalized code (`ChangeSize.between`), so deleting comments, blank
  lines or docstrings, or joining lines, is not simpler code.
- With no noise estimate yet (no repeat measured), the rule falls back to `min_delta` alone.
- `rule = "posterior"` (a setting, not the default: docs/judge.md has the figures): the same estimate and
  standard error (paired or not) are judged against a prior of effects learned from the line's judged
  candidates (`daemon.research.prior`, empirical Bayes): keep when the posterior chance of no real
  improvement (a local false discovery rate) is <= `posterior_q`, discard when the chance of a gain of
  `posterior_worth_sigma` or more is below `posterior_futility`, else confirm.

`Verdict` carries the numbers (improvement, margin, sigma, df, n, t, p, alpha); the store keeps them on the
experiment (`Verdict.as_record()`), and the morning report shows them for each keep. `LegacyRule` is the
rule this one replaced (single run against the best's single run, sigma from the first three runs), kept
only so that `bench/judge_sim.py` can compare both.
"""

from __future__ import annotations

import ast
import difflib
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np

from daemon import syntax
from daemon.config import JudgeConfig
from daemon.research.prior import EffectPrior


class Decision(str, Enum):
    KEEP = "keep"
    DISCARD = "discard"
    CONFIRM = "confirm"  # a close call: run again with another seed, then judge the mean


@dataclass(frozen=True)
class Noise:
    """The pooled noise of single runs: sigma and its degrees of freedom (0 = not measured yet)."""

    sigma: float
    df: int


@dataclass(frozen=True)
class ChangeSize:
    """Lines a change adds and removes (from its unified diff)."""

    added: int
    removed: int

    @property
    def net(self) -> int:
        return self.added - self.removed

    @classmethod
    def between(cls, parent: str, child: str) -> ChangeSize:
        """Code lines added and removed, counted on the normalized code (`code_lines`): comments, blank lines,
        docstrings and formatting do not count, so deleting them is not "simpler code". Falls back to the
        text lines when a source does not parse."""
        try:
            before, after = list(_cached_code_lines(parent)), list(_cached_code_lines(child))
        except SyntaxError:
            before, after = parent.splitlines(), child.splitlines()
        added = removed = 0
        matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag != "equal":
                removed += i2 - i1
                added += j2 - j1
        return cls(added, removed)

    @classmethod
    def of_diff(cls, diff: str) -> ChangeSize:
        added = removed = 0
        for line in diff.splitlines():
            if line.startswith(("+++", "---")):
                continue
            if line.startswith("+") and line[1:].strip():
                added += 1
            elif line.startswith("-") and line[1:].strip():
                removed += 1
        return cls(added, removed)


@functools.lru_cache(maxsize=64)
def _cached_code_lines(source: str) -> tuple[str, ...]:
    """`code_lines`, remembered: a best is the parent of many candidates, and each look judges again."""
    return tuple(code_lines(source))


def code_lines(source: str) -> list[str]:
    """The source's code as `ast.unparse` writes it, docstrings dropped: one line per statement, no comments."""
    tree = syntax.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return [line for line in ast.unparse(tree).splitlines() if line.strip()]


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    rule: str  # significant | simpler | futile | not-significant | runs-exhausted | no-noise-estimate | ...
    improvement: float  # incumbent mean - candidate mean (positive = better; val_bpb is lower-is-better)
    margin: float  # the improvement this look needed for a keep
    sigma: float
    df: int
    n: int  # runs of the candidate
    n_incumbent: int
    t: float | None
    p: float | None
    alpha: float | None  # the false-keep rate spent on this look
    extra_gain: float  # what a large change or extra memory had to win on top of the noise
    reason: str
    paired: bool = False  # judged on seed-paired differences (`Pairs`) rather than on the two means
    differences: tuple[float, ...] = ()  # incumbent - candidate per shared seed (stored: the paired noise's data)
    se: float | None = None  # standard error of `improvement` (the posterior rule's evidence, `prior.Evidence`)
    removes_code: bool = False  # the change removes more code lines than it adds (`ChangeSize.net` < 0)

    def as_record(self) -> dict[str, Any]:
        """The verdict as stored with the experiment (JSON)."""
        data = asdict(self)
        data["decision"] = self.decision.value
        data["differences"] = list(self.differences)
        return data


@dataclass(frozen=True)
class Pairs:
    """Seed-paired looks of a candidate: incumbent run - candidate run on each of the candidate's seeds, and the
    noise of one such difference (`paired_noise`), which is smaller than sqrt(2) sigma by the seed's share."""

    differences: tuple[float, ...]
    noise: Noise


def paired_noise(groups: Iterable[Sequence[float]]) -> Noise:
    """Sigma of one paired difference, pooled within candidates (each group: one candidate's differences; its
    true effect cancels in the deviations from its own mean)."""
    return pooled_noise(groups)


def seed_share(single: Noise, paired: Noise) -> float | None:
    """The share of a run's variance that the seed explains and pairing cancels: 1 - sigma_d^2 / (2 sigma^2)."""
    if not (single.df and paired.df and single.sigma > 0):
        return None
    return 1.0 - paired.sigma ** 2 / (2.0 * single.sigma ** 2)


def pooled_noise(groups: Iterable[Sequence[float]]) -> Noise:
    """Sigma pooled over groups of repeats of one source each: sum of squared deviations / sum of (n - 1)."""
    squares = 0.0
    df = 0
    for group in groups:
        values = [float(v) for v in group]
        for value in values:
            _check_number("a repeated val_bpb", value)
        if len(values) < 2:
            continue
        mean = math.fsum(values) / len(values)
        squares += math.fsum((v - mean) ** 2 for v in values)
        df += len(values) - 1
    return Noise(math.sqrt(squares / df) if df else 0.0, df)


def look_alpha(config: JudgeConfig, look: int | None = None) -> float:
    """The nominal false-keep rate of look `look` (1 = the candidate's first run): a Wang-Tsiatis boundary over
    the looks at which a keep can happen (`keep_min_runs` .. `max_runs`).

    A keep at any of those looks must stay below `false_keep_rate` overall: the boundary on the z statistic of
    look k is c (k / K)^(shape - 1/2) (`boundary_shape` 0.5: Pocock's, the same level at every look; 0:
    O'Brien-Fleming's, strict early and lenient late), with c the level at which a Gaussian random walk
    observed at those looks crosses it with chance `false_keep_rate` (`_boundary_levels`). Looks before
    `keep_min_runs` cannot keep, so they spend nothing. Stopping early for futility only lowers the real rate.
    Without `look`: the level of the last look (the most lenient one under every shape).
    """
    if not config.confirm:
        return config.false_keep_rate
    first = min(config.keep_min_runs, config.max_runs) if config.boundary_looks == "keep" else 1
    levels = _boundary_levels(config.false_keep_rate, config.max_runs, first, config.boundary_shape)
    return levels[min(max(look or config.max_runs, 1), config.max_runs) - 1]


@functools.lru_cache(maxsize=64)
def _boundary_levels(alpha: float, looks: int, first: int = 1, shape: float = 0.5) -> tuple[float, ...]:
    """Nominal one-sided levels of looks 1..K at a z statistic (the z of look k: S_k / sqrt(k), S_k a sum of k
    N(0, 1)), with P(z_k >= c (k / K)^(shape - 1/2) at some look k >= first) = alpha; looks before `first`
    cannot keep: they show the level of look `first` (what a keep would need). Found by integrating the walk's
    density on a grid, and bisection on c."""
    if looks <= 1 or first >= looks:
        return (alpha,) * max(looks, 1)  # one look can keep: it spends all of alpha
    step = 0.02
    weights = [(k / looks) ** (shape - 0.5) for k in range(1, looks + 1)]
    z_low, z_high = 0.0, _normal_quantile(1 - alpha / looks) / min(weights)  # Bonferroni: c is below this
    top = z_high * max(w * math.sqrt(k) for k, w in enumerate(weights, start=1))
    grid = np.arange(-8.0 * math.sqrt(looks), top + step, step)
    kernel = np.exp(-0.5 * (grid[:, None] - grid[None, :]) ** 2) / math.sqrt(2 * math.pi) * step
    normal_sf = np.vectorize(lambda z: 0.5 * math.erfc(z / math.sqrt(2.0)))

    def crossing(c: float) -> float:
        density = np.exp(-0.5 * grid ** 2) / math.sqrt(2 * math.pi)  # S_1, a sum of one N(0, 1)
        crossed = 0.0
        if first <= 1:
            crossed = float(normal_sf(c * weights[0]))
            density = np.where(grid < c * weights[0], density, 0.0)
        for k in range(2, looks + 1):
            if k < first:
                density = kernel @ density
                continue
            bound = c * weights[k - 1] * math.sqrt(k)  # the bound on S_k
            crossed += float(np.sum(density * normal_sf(bound - grid)) * step)
            density = np.where(grid < bound, kernel @ density, 0.0)
        return crossed

    for _ in range(50):
        middle = (z_low + z_high) / 2
        if crossing(middle) > alpha:
            z_low = middle
        else:
            z_high = middle
    levels = [0.5 * math.erfc(z_high * weights[k - 1] / math.sqrt(2.0)) for k in range(1, looks + 1)]
    return tuple(levels[max(k, first) - 1] for k in range(1, looks + 1))


def _pocock_level(alpha: float, looks: int) -> float:
    """Nominal one-sided level c of K equally spaced looks at a z statistic with P(any look >= c) = alpha."""
    return _boundary_levels(alpha, looks)[0]


def _normal_quantile(q: float) -> float:
    low, high = -40.0, 40.0
    for _ in range(200):
        middle = (low + high) / 2
        if 0.5 * math.erfc(-middle / math.sqrt(2.0)) < q:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def decide(candidate: Sequence[float], incumbent: Sequence[float], noise: Noise, config: JudgeConfig, *,
           change: ChangeSize | None = None, peak_memory_mb: float | None = None,
           pairs: Pairs | None = None, prior: EffectPrior | None = None) -> Verdict:
    """Judge a candidate's runs so far against the incumbent's runs: keep, discard, or confirm with one more run.

    With `pairs` (every look of the candidate has an incumbent run on the same seed) and a paired noise
    measured on at least `paired_min_df` degrees of freedom, the test is on the mean paired difference when
    its standard error is the smaller one; else on the two means (the fallback when pairing is broken)."""
    if not candidate or not incumbent:
        raise ValueError("decide needs at least one run of the candidate and one of the incumbent")
    for value in (*candidate, *incumbent):
        _check_number("val_bpb", value)
    if not (math.isfinite(noise.sigma) and noise.sigma >= 0 and noise.df >= 0):
        raise ValueError(f"noise must have a finite sigma >= 0 and df >= 0, got {noise}")
    n, n_inc = len(candidate), len(incumbent)
    improvement = math.fsum(incumbent) / n_inc - math.fsum(candidate) / n
    may_confirm = config.confirm and n < config.max_runs
    base: dict[str, Any] = {"improvement": improvement, "sigma": noise.sigma, "df": noise.df, "n": n, "n_incumbent": n_inc}
    if noise.df == 0 or noise.sigma == 0.0:
        decision = Decision.KEEP if improvement > config.min_delta else Decision.DISCARD
        return Verdict(decision, "no-noise-estimate", margin=config.min_delta, t=None, p=None, alpha=None,
                       extra_gain=0.0, reason=f"no repeat measured yet: improvement {improvement:.6f} "
                       f"{'>' if decision is Decision.KEEP else '<='} min_delta {config.min_delta:.6f}", **base)
    sigma = noise.sigma
    se, df = sigma * math.sqrt(1.0 / n + 1.0 / n_inc), noise.df
    paired = _usable(pairs, n, config)
    if paired is not None and pairing_pays(noise, paired.noise, n, n_inc):
        improvement, se, df = math.fsum(paired.differences) / n, paired.noise.sigma / math.sqrt(n), paired.noise.df
        base["improvement"] = improvement
    else:
        paired = None
    alpha = look_alpha(config, n)
    critical = t_quantile(1.0 - alpha, df)
    extra, why_extra = _extra_gain(sigma, config, change, peak_memory_mb)
    t = (improvement - extra) / se
    p = t_sf(t, df)
    margin = max(extra + critical * se, config.min_delta)
    numbers = (f"t = {t:.2f} (df {df}), p = {p:.4f} vs alpha {alpha:.4f}, sigma {sigma:.6f}, runs {n} vs "
               + (f"{n} paired by seed (paired sigma {paired.noise.sigma:.6f}, seed share "
                  f"{seed_share(noise, paired.noise) or 0.0:.0%})" if paired is not None else f"{n_inc}"))
    stats: dict[str, Any] = {"t": t, "p": p, "alpha": alpha, "extra_gain": extra, "margin": margin, **base,
                             "paired": paired is not None, "df": df, "se": se,
                             "removes_code": change is not None and change.net < 0,
                             "differences": tuple(pairs.differences) if pairs is not None else ()}
    if config.rule == "posterior":
        center = -config.simplicity_margin_sigma if config.simplicity and change is not None and change.net < 0 \
            else 0.0
        return _posterior(improvement, sigma, se, df, n, config, change, extra, prior or EffectPrior.default(center),
                          stats, numbers, may_confirm)
    if p <= alpha and improvement > config.min_delta:
        if may_confirm and n < config.keep_min_runs:
            return Verdict(Decision.CONFIRM, "confirm-before-keep", reason=f"improvement {improvement:.6f} > margin "
                           f"{margin:.6f}{why_extra} on {n} run(s): a keep needs {config.keep_min_runs} ({numbers})",
                           **stats)
        return Verdict(Decision.KEEP, "significant", reason=f"mean improvement {improvement:.6f} > margin "
                       f"{margin:.6f}{why_extra}: {numbers}", **stats)
    simpler = _simplicity(improvement, sigma, se, df, n, config, change, stats, numbers)
    if simpler is not None:
        return simpler
    if may_confirm and t >= config.futility_t:
        return Verdict(Decision.CONFIRM, "close-call", reason=f"improvement {improvement:.6f} within the margin "
                       f"{margin:.6f}{why_extra}: confirm with another seed ({numbers})", **stats)
    rule = "futile" if t < config.futility_t else "runs-exhausted" if config.confirm else "not-significant"
    return Verdict(Decision.DISCARD, rule, reason=f"improvement {improvement:.6f} does not exceed the margin "
                   f"{margin:.6f}{why_extra}: {numbers}", **stats)


def _posterior(improvement: float, sigma: float, se: float, df: int, n: int, config: JudgeConfig,
               change: ChangeSize | None, extra: float, prior: EffectPrior, stats: dict[str, Any], numbers: str,
               may_confirm: bool) -> Verdict:
    """The posterior rule (`config.rule = "posterior"`): keep when P(no real improvement | runs) <= posterior_q.

    No real improvement: an effect <= the extra gain the change must show (0 for most changes), or, for a
    change that removes code (simplicity on), an effect below -simplicity_margin_sigma. The effect's
    likelihood is Student's t around the estimate (df of the noise); its prior is the line's (`prior`)."""
    simpler = config.simplicity and change is not None and change.net < 0
    null = -config.simplicity_margin_sigma - 1e-6 if simpler else extra / sigma
    estimate, spread = improvement / sigma, se / sigma
    p_null = prior.posterior_at_most(null, estimate, spread, df)
    low, high = -20.0, 20.0  # the estimate this look needed (bisection: p_null falls as the estimate grows)
    for _ in range(24):
        middle = (low + high) / 2
        low, high = (middle, high) if prior.posterior_at_most(null, middle, spread, df) > config.posterior_q \
            else (low, middle)
    needed = max(high * sigma, config.min_delta if not simpler else -math.inf)
    stats = {**stats, "p": p_null, "alpha": config.posterior_q, "margin": needed}
    test = (f"P(no real improvement) = {p_null:.4f} vs q {config.posterior_q:.4f} under the line's prior "
            f"(prior P = {prior.probability(null):.2f}); {numbers}")
    what = f"removes {-change.net} lines; " if simpler and change is not None else ""
    if p_null <= config.posterior_q and (simpler or improvement > config.min_delta):
        if may_confirm and n < config.keep_min_runs:
            return Verdict(Decision.CONFIRM, "confirm-before-keep", reason=f"{what}a keep needs "
                           f"{config.keep_min_runs} runs: {test}", **stats)
        return Verdict(Decision.KEEP, "simpler" if simpler and improvement <= 0 else "posterior",
                       reason=f"{what}{test}", **stats)
    worth = null + config.posterior_worth_sigma
    p_worth = 1.0 - (prior.posterior_at_most(worth, estimate, spread, df) if config.posterior_worth_sigma else p_null)
    if p_worth < config.posterior_futility:
        return Verdict(Decision.DISCARD, "futile", reason=f"{what}P(better by {config.posterior_worth_sigma:g} "
                       f"sigma or more) = {p_worth:.4f} < {config.posterior_futility:g}: {test}", **stats)
    if may_confirm:
        return Verdict(Decision.CONFIRM, "close-call", reason=f"{what}confirm with another seed: {test}", **stats)
    return Verdict(Decision.DISCARD, "runs-exhausted" if config.confirm else "not-significant",
                   reason=f"{what}{test}", **stats)


def _extra_gain(sigma: float, config: JudgeConfig, change: ChangeSize | None,
                peak_memory_mb: float | None) -> tuple[float, str]:
    extra, why = config.min_gain_sigma * sigma, []
    if config.min_gain_sigma:
        why.append(f"every change must win by {config.min_gain_sigma:g} sigma")
    if change is not None and change.net >= config.large_change_lines:
        extra += config.large_change_gain_sigma * sigma
        why.append(f"{change.net} added lines need {config.large_change_gain_sigma:g} sigma more")
    limit = config.memory_soft_limit_mb
    if limit is not None and peak_memory_mb is not None and peak_memory_mb > limit:
        over_gb = (peak_memory_mb - limit) / 1024
        extra += config.memory_gain_sigma_per_gb * over_gb * sigma
        why.append(f"peak memory {over_gb:.2f} GB over the soft limit")
    return extra, (" (" + "; ".join(why) + ")") if why else ""


def _usable(pairs: Pairs | None, n: int, config: JudgeConfig) -> Pairs | None:
    """The pairs when the paired test may be used: pairing on, every look paired, paired noise measured."""
    if pairs is None or not config.paired or len(pairs.differences) != n:
        return None
    if pairs.noise.df < config.paired_min_df or not pairs.noise.sigma > 0:
        return None
    for value in pairs.differences:
        _check_number("a paired difference", value)
    return pairs


PAIRING_Z = 1.645  # the paired test is used when pairing pays at this one-sided confidence (`pairing_pays`)


def pairing_pays(single: Noise, paired: Noise, n: int, n_incumbent: int) -> bool:
    """Whether the paired test is the more precise one, with confidence: the paired variance n looks give,
    2 (1 - seed share) sigma^2 / n, is below the unpaired one, sigma^2 (1/n + 1/n_incumbent), even at the
    upper `PAIRING_Z` bound of the variance ratio (log-normal approximation, var(ln s^2) = 2 / df).

    Picking the smaller of two estimated standard errors look by look would pick the one that happens to be
    underestimated and raise the false-keep rate; this gate uses pairing only where it clearly helps."""
    if not (single.df and paired.df and single.sigma > 0 and paired.sigma > 0):
        return False
    ratio = paired.sigma ** 2 / (2.0 * single.sigma ** 2)
    threshold = (1.0 + n / n_incumbent) / 2.0
    return math.log(ratio) + PAIRING_Z * math.sqrt(2.0 / paired.df + 2.0 / single.df) < math.log(threshold)


def simplicity_level(config: JudgeConfig) -> float:
    """The nominal level of each look of the simplicity test: Pocock's constant level over all `max_runs` looks."""
    if config.simplicity_alpha is None:
        raise ValueError("simplicity_alpha is None: the point rule has no level")
    return _pocock_level(config.simplicity_alpha, config.max_runs if config.confirm else 1)


def _simplicity(improvement: float, sigma: float, se: float, df: int, n: int, config: JudgeConfig,
                change: ChangeSize | None, stats: dict[str, Any], numbers: str) -> Verdict | None:
    """Equal result, simpler code: a change that removes code is kept when it is not worse than the incumbent
    by `simplicity_margin_sigma` sigma or more, a non-inferiority test at `simplicity_alpha` (a change that
    truly costs the margin is kept with chance simplicity_alpha at most, over all its looks).
    `simplicity_alpha = None` is the rule before the test: over two runs or more, the mean is not worse by
    more than the margin (no statistics; kept for the comparison in `bench/judge_sim.py`)."""
    if not config.simplicity or change is None or change.net >= 0:
        return None
    margin = config.simplicity_margin_sigma * sigma
    if config.simplicity_alpha is None:
        if n >= 2 and improvement >= -margin:
            return Verdict(Decision.KEEP, "simpler", reason=f"removes {-change.net} lines and is no worse within "
                           f"noise (improvement {improvement:.6f} >= -{margin:.6f}): {numbers}", **stats)
        if n < 2 and config.confirm and config.max_runs >= 2 and improvement >= -margin - se:
            return Verdict(Decision.CONFIRM, "simpler-close-call", reason=f"removes {-change.net} lines: a second "
                           f"run decides whether it is as good ({numbers})", **stats)
        return None
    level = simplicity_level(config)
    t_ni = (improvement + margin) / se
    p_ni = t_sf(t_ni, df)
    test = (f"non-inferiority: t = {t_ni:.2f}, p = {p_ni:.4f} vs alpha {level:.4f} for a margin of "
            f"{config.simplicity_margin_sigma:g} sigma")
    if p_ni <= level:
        return Verdict(Decision.KEEP, "simpler", reason=f"removes {-change.net} lines and is not worse by "
                       f"{margin:.6f} or more ({test}): {numbers}", **stats)
    if config.confirm and n < config.max_runs and t_ni >= config.futility_t:
        return Verdict(Decision.CONFIRM, "simpler-close-call", reason=f"removes {-change.net} lines: another run "
                       f"decides whether it is as good ({test}; {numbers})", **stats)
    return None


# -- Student's t distribution (no SciPy here) ---------------------------------------------------------


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (normal for very large df)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df > 10_000:
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


@functools.lru_cache(maxsize=4096)
def t_quantile(q: float, df: int) -> float:
    """The t with P(T <= t) = q (bisection on `t_sf`; q in (0, 1))."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    low, high = -1e3, 1e3
    for _ in range(64):
        middle = (low + high) / 2
        if 1.0 - t_sf(middle, df) < q:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return math.exp(log_front) * result / a


def _check_number(what: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")


# -- the rule this one replaced (for bench/judge_sim.py only) ---------------------------------------


class LegacyRule:
    """The old keep rule: one run against the best's one run, margin max(min_delta, k * std), one confirmation.

    `std` was the sample std of the baseline and its noise runs, never updated; the best was stored as the
    kept run's own value. Kept for the side-by-side comparison in `bench/judge_sim.py`; the daemon uses `decide`.
    """

    @staticmethod
    def margin(noise_std: float, config: JudgeConfig, runs: int = 1) -> float:
        if runs < 1:
            raise ValueError(f"runs must be >= 1, got {runs}")
        return max(config.min_delta, config.k * noise_std / math.sqrt(runs))

    @classmethod
    def first_look(cls, candidate_bpb: float, best_bpb: float, noise_std: float, config: JudgeConfig) -> Decision:
        improvement = best_bpb - candidate_bpb
        if improvement > cls.margin(noise_std, config):
            return Decision.KEEP
        if config.confirm and improvement > cls.margin(noise_std, config, runs=2):
            return Decision.CONFIRM
        return Decision.DISCARD

    @classmethod
    def confirmed(cls, measurements: Sequence[float], best_bpb: float, noise_std: float,
                  config: JudgeConfig) -> Decision:
        mean = math.fsum(measurements) / len(measurements)
        improved = best_bpb - mean > cls.margin(noise_std, config, runs=len(measurements))
        return Decision.KEEP if improved else Decision.DISCARD
