"""How many of the judge's keeps should hold on the morning re-test, on the synthetic landscape of judge_sim.

The nights are `bench/judge_sim.py`'s (`new_night`: the daemon's own planner, keeper and judge over 100 runs,
ideas with known true effects in sigma). Every kept change is then re-tested as `daemon.research.retest` does:
k pairs (the keep and its parent on one fresh seed each), d_i = keep - parent, a Student-t interval at 95%
(`daemon.research.retest.paired`), held when the whole interval is below zero. Runs of one pair share their
seed: `rho` is the correlation that sharing gives two runs (0: none, the worst case; real training shares init
and data order, so more). The night's own re-test (end best against start best) is simulated the same way.

Figures (per column: k pairs, rho):
  true share         keeps whose true effect on their parent was > 0 (what "held" would be with infinite runs)
  held (expected)    expected share of keeps the re-test reports as held
  held | effect 0    chance a keep that truly did nothing is reported held (about 2.5%: one side of the CI)
  held | 1/2/3 sig   chance a keep that truly gained 1, 2, 3 sigma is reported held (the re-test's power)
  night held         share of nights whose end best is reported better than the start best

    python bench/retest_sim.py [--nights 200] [--seed 1]
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.judge_sim import new_night
from daemon.config import JudgeConfig
from daemon.research.retest import paired

DRAWS = 4000
COLUMNS = ((3, 0.0), (3, 0.5), (5, 0.0))


def held_chance(effect: float, k: int, rho: float, rng: random.Random, draws: int = DRAWS) -> float:
    """P(the re-test reports held) for a change that truly gains `effect` sigma, k pairs, seed correlation rho."""
    shared, own = math.sqrt(rho), math.sqrt(1.0 - rho)
    held = 0
    for _ in range(draws):
        parent, keep = [], []
        for _ in range(k):
            seed = rng.gauss(0.0, 1.0) * shared
            parent.append(seed + rng.gauss(0.0, 1.0) * own)
            keep.append(-effect + seed + rng.gauss(0.0, 1.0) * own)
        delta, half = paired(parent, keep, 0.95)
        held += half is not None and delta + half < 0
    return held / draws


def expected_held(effects: Sequence[float], k: int, rho: float, rng: random.Random) -> float:
    cache: dict[float, float] = {}
    total = 0.0
    for effect in effects:
        key = round(effect, 1)
        if key not in cache:
            cache[key] = held_chance(key, k, rho, rng, draws=DRAWS // 4)
        total += cache[key]
    return total / len(effects) if effects else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nights", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    rng = random.Random(args.seed)
    config = JudgeConfig()
    kept_effects: list[float] = []
    night_gains: list[float] = []
    for _ in range(args.nights):
        night = new_night(config, rng)
        kept_effects += [effect for effect, kept in night.judged if kept]
        night_gains.append(night.gain)
    true_share = sum(e > 0 for e in kept_effects) / len(kept_effects) if kept_effects else float("nan")
    print(f"{args.nights} nights of judge_sim's landscape under the current keep rule (defaults of [judge]): "
          f"{len(kept_effects)} keeps, {len(kept_effects) / args.nights:.2f} per night\n")
    header = f"{'':22}" + "".join(f"{f'k={k}, rho={rho:g}':>18}" for k, rho in COLUMNS)
    print(header)
    rows = [("true share", lambda k, rho: true_share),
            ("held (expected)", lambda k, rho: expected_held(kept_effects, k, rho, rng)),
            ("held | effect 0", lambda k, rho: held_chance(0.0, k, rho, rng)),
            ("held | 1 sigma", lambda k, rho: held_chance(1.0, k, rho, rng)),
            ("held | 2 sigma", lambda k, rho: held_chance(2.0, k, rho, rng)),
            ("held | 3 sigma", lambda k, rho: held_chance(3.0, k, rho, rng)),
            ("night held", lambda k, rho: expected_held(night_gains, k, rho, rng))]
    for name, figure in rows:
        print(f"{name:22}" + "".join(f"{figure(k, rho):>18.1%}" for k, rho in COLUMNS))


if __name__ == "__main__":
    main()
