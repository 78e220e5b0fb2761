"""How a short training run (a screen) ranks changes against a full run: the numbers judge_sim's `Screen` assumes.

For the baseline trainer/train.py and a list of small edits of the kind the agent makes (each an exact (old, new)
text replacement, applied once), every source trains at two budgets, a FULL one of N steps and a SHORT one of
`--short-fraction` x N steps, for the same seeds (paired), then the real eval stage scores it
(`python -m trainer.harness` train + eval, as bench/seed_share.py does). Every run trains a fixed number of steps
(AUTORESEARCH_MAX_STEPS, the schedule by steps), so machine load cannot change a result; torch gets one thread
(OMP_NUM_THREADS=1). One more "change" is the baseline itself at 0.8 x the steps at both budgets: what a 20%
slower-per-step change gets in a fixed time budget, to see the slow-step bias of a short run directly.

`analyse` (a pure function over the raw val_bpb values) gives, in units of sigma_full (the pooled sd over seeds of
one full run): each change's effect (baseline - change, mean over seeds) at both budgets, the screen's noise (the
pooled sd of one seed's short paired difference), the correlation and both regression slopes of the short effects
against the full ones across the changes, the transfer error's sd (the sd of short - full across changes less the
part the seed noise explains, floored at 0; also after rescaling the short effects by the slope) and the slow
penalty (effect_short - effect_full of the 0.8-steps baseline; negative: the short run penalises slowness more).
Usage: python bench/screen_transfer.py [--steps 120] [--short-fraction 0.25] [--seeds 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

BASELINE = "baseline"
SLOW = "slow_0.8_steps"
FULL, SHORT = "full", "short"
# Seed noise, in full sigma, of judge_sim.Screen's defaults (the model's assumptions, printed next to the fit).
ASSUMED = {"noise_sd": 2.0, "transfer_sd": 0.5, "slow_penalty": 0.5}


@dataclass(frozen=True)
class Change:
    name: str
    old: str = ""
    new: str = ""
    step_factor: float = 1.0  # the baseline source at this share of the steps (both budgets)


CHANGES = (  # the slow one first: with less time than planned, the extra seeds reach it early
    Change(SLOW, step_factor=0.8),
    Change("matrix_lr_x1.5", "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.06 "),
    Change("matrix_lr_x0.6", "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.025"),
    Change("embedding_lr_x0.5", "EMBEDDING_LR = 0.6 ", "EMBEDDING_LR = 0.3 "),
    Change("warmdown_0.5_to_0.2", "WARMDOWN_FRACTION = 0.5 ", "WARMDOWN_FRACTION = 0.2 "),
    Change("warmup_0.1", "WARMUP_FRACTION = 0.0 ", "WARMUP_FRACTION = 0.1 "),
    Change("no_weight_decay", "WEIGHT_DECAY = 0.2 ", "WEIGHT_DECAY = 0.0 "),
    Change("depth_4_to_5", '"cpu":  dict(depth=4,', '"cpu":  dict(depth=5,'),  # slower per step
    Change("gelu_mlp", "F.relu(self.c_fc(x)).square()", "F.gelu(self.c_fc(x))"),
    Change("no_x0_scalars", "x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0",
           "x = self.resid_lambdas[i] * x"),
)


def apply_change(source: str, change: Change) -> str:
    """The baseline source with `change` applied; fails loudly unless `old` occurs exactly once."""
    if not change.old:
        return source
    count = source.count(change.old)
    if count != 1:
        raise ValueError(f"change {change.name}: {change.old!r} occurs {count} times in train.py, not once")
    return source.replace(change.old, change.new)


# ---------------------------------------------------------------------------------------------
# Analysis: raw[source][budget][seed] = val_bpb

Raw = dict[str, dict[str, dict[int, float]]]


def pooled_sd(groups: list[list[float]]) -> float:
    """sqrt(sum of squared deviations from each group's mean / sum of (n - 1)); groups of one add nothing."""
    ss = sum((v - statistics.fmean(g)) ** 2 for g in groups if len(g) > 1 for v in g)
    df = sum(len(g) - 1 for g in groups if len(g) > 1)
    if df == 0:
        raise ValueError("no source has two seeds: no pooled sd")
    return math.sqrt(ss / df)


def paired(raw: Raw, change: str, budget: str) -> list[float]:
    """baseline - change per seed that both ran at `budget` (positive: the change lowers val_bpb)."""
    base, other = raw[BASELINE][budget], raw[change][budget]
    return [base[s] - other[s] for s in sorted(base.keys() & other.keys())]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else math.nan


def chi2_quantile(p: float, df: int) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (no scipy here)."""
    z = statistics.NormalDist().inv_cdf(p)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def transfer_fit(residuals: list[float], noise_var: float) -> dict[str, float]:
    """sd of the residuals across changes, less the seed noise's variance (floored at 0), with a 90% interval
    from the chi-square distribution of the residuals' sample variance (m - 1 degrees of freedom)."""
    m = len(residuals)
    var = statistics.variance(residuals)
    low_var = var * (m - 1) / chi2_quantile(0.95, m - 1)
    high_var = var * (m - 1) / chi2_quantile(0.05, m - 1)
    return {"residual_sd": math.sqrt(var), "noise_sd": math.sqrt(noise_var),
            "transfer_sd": math.sqrt(max(var - noise_var, 0.0)),
            "transfer_sd_90_low": math.sqrt(max(low_var - noise_var, 0.0)),
            "transfer_sd_90_high": math.sqrt(max(high_var - noise_var, 0.0))}


def analyse(raw: Raw, slow: str = SLOW) -> dict[str, object]:
    """Every figure of the module docstring from the raw values (sources with a missing budget are skipped)."""
    sources = [s for s in raw if raw[s].get(FULL) and raw[s].get(SHORT)]
    sigma = {b: pooled_sd([list(raw[s][b].values()) for s in sources]) for b in (FULL, SHORT)}
    changes = [s for s in sources if s != BASELINE]
    diffs = {c: {b: paired(raw, c, b) for b in (FULL, SHORT)} for c in changes}
    changes = [c for c in changes if diffs[c][FULL] and diffs[c][SHORT]]
    # One seed's paired difference, pooled over changes, in full sigma: the screen's noise (short) and the
    # full run's own (what seed noise leaves in a full effect).
    noise = {b: pooled_sd([diffs[c][b] for c in changes]) / sigma[FULL] for b in (FULL, SHORT)}
    table = {c: {"effect_short": statistics.fmean(diffs[c][SHORT]) / sigma[FULL],
                 "effect_full": statistics.fmean(diffs[c][FULL]) / sigma[FULL],
                 "seeds_short": len(diffs[c][SHORT]), "seeds_full": len(diffs[c][FULL])} for c in changes}
    for row in table.values():
        row["short_minus_full"] = row["effect_short"] - row["effect_full"]
    edits = [c for c in changes if c != slow]
    short = [table[c]["effect_short"] for c in edits]
    full = [table[c]["effect_full"] for c in edits]

    def noise_var(names: list[str], scale: float = 1.0) -> float:  # seed noise in (short / scale - full), mean
        return statistics.fmean(noise[SHORT] ** 2 / scale ** 2 / table[c]["seeds_short"]
                                + noise[FULL] ** 2 / table[c]["seeds_full"] for c in names)

    out: dict[str, object] = {"sigma_full": sigma[FULL], "sigma_short": sigma[SHORT],
                              "sigma_short_over_full": sigma[SHORT] / sigma[FULL],
                              "screen_noise": noise[SHORT], "full_paired_noise": noise[FULL],
                              "changes": table, "edits": len(edits)}
    if len(edits) >= 3:
        corr = statistics.correlation(short, full)
        half = statistics.NormalDist().inv_cdf(0.95) / math.sqrt(len(edits) - 3) if len(edits) > 3 else math.inf
        z = math.atanh(max(min(corr, 1 - 1e-12), -1 + 1e-12))  # Fisher's z: its 90% interval, back in r
        k = slope(full, short)  # short = k * full + ...: the short run's scale
        out.update(correlation=corr, correlation_90=(math.tanh(z - half), math.tanh(z + half)),
                   slope_full_on_short=slope(short, full), slope_short_on_full=k,
                   transfer=transfer_fit([s - f for s, f in zip(short, full, strict=True)], noise_var(edits)),
                   transfer_rescaled=transfer_fit([s / k - f for s, f in zip(short, full, strict=True)],
                                                  noise_var(edits, k)) if k > 0 else None,
                   screen_noise_rescaled=noise[SHORT] / k if k > 0 else None)
    if slow in table:
        out["slow_penalty"] = table[slow]["short_minus_full"]
        out["slow_penalty_se"] = math.sqrt(noise_var([slow]))
    return out


# ---------------------------------------------------------------------------------------------
# Running

def one_run(data_dir: Path, source: str, seed: int, steps: int, env: dict[str, str]) -> tuple[float, float]:
    """(val_bpb, wall seconds) of `source` trained `steps` steps under `seed`, then scored by the eval stage."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="screen-transfer-") as tmp:
        candidate, train_out, eval_out = Path(tmp) / "train.py", Path(tmp) / "train", Path(tmp) / "eval"
        candidate.write_text(source)
        for args in (["train", "--candidate", str(candidate), "--data", str(data_dir / "train"), "--out",
                      str(train_out)],
                     ["eval", "--checkpoint", str(train_out / "model.pt2"), "--data", str(data_dir / "val"),
                      "--out", str(eval_out)]):
            done = subprocess.run([sys.executable, "-m", "trainer.harness", *args],
                                  env={**env, "AUTORESEARCH_SEED": str(seed), "AUTORESEARCH_MAX_STEPS": str(steps)},
                                  cwd=REPO_ROOT, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"stage {args[0]} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
        ran = json.loads((train_out / "train.json").read_text())["summary"]["num_steps"]
        if int(ran) != steps:
            sys.exit(f"asked for {steps} steps, the run trained {ran}")
        return float(json.loads((eval_out / "result.json").read_text())["val_bpb"]), time.monotonic() - started


def print_report(result: dict[str, object], args: argparse.Namespace, wall: float) -> None:
    print("--- screen_transfer")
    print(f"preset {args.preset}, full {args.steps} steps, short {short_steps(args.steps, args)} steps, "
          f"{args.eval_tokens} eval tokens, vocab {args.vocab_size}, {wall / 60:.1f} min")
    print(f"sigma_full  {result['sigma_full']:.6f} bpb   sigma_short {result['sigma_short']:.6f} bpb "
          f"({result['sigma_short_over_full']:.2f} sigma_full)")
    print(f"screen noise (one seed's short paired difference): {result['screen_noise']:.2f} sigma_full "
          f"(assumed {ASSUMED['noise_sd']}); full run's paired difference {result['full_paired_noise']:.2f}")
    print(f"{'change':<22} {'short':>8} {'full':>8} {'short-full':>10}  (effects in sigma_full, + = better)")
    for name, row in result["changes"].items():  # type: ignore[attr-defined]
        print(f"{name:<22} {row['effect_short']:>8.2f} {row['effect_full']:>8.2f} {row['short_minus_full']:>10.2f}")
    if "correlation" in result:
        low, high = result["correlation_90"]  # type: ignore[misc]
        print(f"correlation short vs full over {result['edits']} edits: {result['correlation']:.2f} "
              f"(90% {low:.2f} .. {high:.2f}); slope full on short {result['slope_full_on_short']:.2f}, "
              f"short on full {result['slope_short_on_full']:.2f}")
        for key in ("transfer", "transfer_rescaled"):
            fit = result.get(key)
            if fit:
                print(f"{key}: residual sd {fit['residual_sd']:.2f}, seed noise in it {fit['noise_sd']:.2f}, "
                      f"transfer_sd {fit['transfer_sd']:.2f} (90% {fit['transfer_sd_90_low']:.2f} .. "
                      f"{fit['transfer_sd_90_high']:.2f}; assumed {ASSUMED['transfer_sd']})")
    if "slow_penalty" in result:
        print(f"slow penalty (effect_short - effect_full at 0.8 steps): {result['slow_penalty']:+.2f} "
              f"± {result['slow_penalty_se']:.2f} sigma_full (assumed -{ASSUMED['slow_penalty']})")


def short_steps(steps: int, args: argparse.Namespace) -> int:
    return max(1, round(steps * args.short_fraction))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120,
                        help="FULL run's steps (~45 s of training on one loaded core here, + ~30 s of stages)")
    parser.add_argument("--short-fraction", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 .. n-1, every seed for every source first")
    parser.add_argument("--only", default="", help="comma-separated change names (default: all)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--json", type=Path, help="save the raw values here (after every run; read back to resume)")
    parser.add_argument("--analyse-only", action="store_true", help="no runs: the report of what --json holds")
    args = parser.parse_args()
    from trainer.prepare import prepare_data

    data_dir = prepare_data("stdlib", REPO_ROOT / ".work" / "bench" / f"stdlib-{args.vocab_size}", args.vocab_size,
                            progress=lambda message: print(f"[prepare] {message}", flush=True))
    baseline = (REPO_ROOT / "trainer" / "train.py").read_text()
    wanted = {n for n in args.only.split(",") if n}
    changes = [Change(BASELINE)] + [c for c in CHANGES if not wanted or c.name in wanted]
    sources = {c.name: apply_change(baseline, c) for c in changes}  # every replacement checked before any run
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(PYTHONPATH=str(REPO_ROOT), AUTORESEARCH_PRESET=args.preset, AUTORESEARCH_TIME_BUDGET="3000",
               AUTORESEARCH_EVAL_TOKENS=str(args.eval_tokens), OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    raw: Raw = {c.name: {FULL: {}, SHORT: {}} for c in changes}
    walls: dict[str, list[float]] = {FULL: [], SHORT: []}
    if args.json and args.json.exists():
        saved = json.loads(args.json.read_text())
        for name, budgets in saved["raw"].items():
            if name in raw:
                raw[name] = {b: {int(s): v for s, v in seeds.items()} for b, seeds in budgets.items()}
        walls = saved.get("walls", walls)
    started = time.monotonic()
    for seed in range(args.seeds):
        for change in [] if args.analyse_only else changes:
            for budget, steps in ((FULL, args.steps), (SHORT, short_steps(args.steps, args))):
                if seed in raw[change.name][budget]:
                    continue
                steps = round(steps * change.step_factor)
                value, wall = one_run(data_dir, sources[change.name], seed, steps, env)
                raw[change.name][budget][seed] = value
                walls[budget].append(wall)
                print(f"{change.name:<22} {budget:<5} seed {seed}: val_bpb {value:.6f} after {steps} steps, "
                      f"{wall:.1f} s ({(time.monotonic() - started) / 60:.1f} min in all)", flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                     "raw": raw, "walls": walls}, indent=1))
    print(f"wall per run (train + eval stages): full {statistics.fmean(walls[FULL]):.1f} s, "
          f"short {statistics.fmean(walls[SHORT]):.1f} s; {sum(map(sum, walls.values())) / 60:.1f} min of runs")
    result = analyse(raw)
    print_report(result, args, time.monotonic() - started)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "raw": raw,
                                         "walls": walls, "result": result}, indent=1))


if __name__ == "__main__":
    main()
