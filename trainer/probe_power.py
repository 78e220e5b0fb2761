"""How likely the eval stage's causality probe is to catch a sparse look-ahead, and the floor it must reach.

Pure arithmetic (no torch): the daemon sizes evals with it and the eval stage checks the rows it scores.

The probe (trainer/eval_stage.py, `probe_batch` / `probe_drift`): every scored row has one probe twin whose
tokens from an unpredictable cut k on are replaced by random tokens; positions < k must give the same
log-probabilities as in the scoring pass. k is T (nothing replaced, every position checked) for one row in
FULL_ROW_SHARE on average, else uniform over [0, T).

A one-token look-ahead at position p (its output reads input p + 1) shows only when position p is checked
while token p + 1 changed, i.e. when the cut is exactly k = p + 1, and the random token differs from the
original. For a checkpoint that peeks at a share f of the positions of a row, one probed row catches it with

    q = (1 - 1/FULL_ROW_SHARE) * f * (1 - 1/vocab)

and R probed rows (their cuts are independent draws of the OS's randomness) with

    P(R) = 1 - (1 - q)^R.

At f = 1%, FULL_ROW_SHARE 4 and a large vocabulary, q = 0.0075: 64 rows catch it with P = 0.38, 612 rows with
P = 0.99. This is per eval: a peek at 1% that survives one eval has ~1% chance to survive each later one.
The floor: an eval that scores fewer rows than `rows_needed()` is not a trust check of causality; the daemon
enlarges its evals to the floor and the eval stage refuses to score below it when the daemon asks
(AUTORESEARCH_PROBE_FLOOR=1). Checked against the real probe code by a Monte-Carlo test
(tests/trainer/test_probe_power.py) and printed by bench/eval_cost.py --probe-trials.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

PEEK_SHARE = 0.01          # the sparse look-ahead the floor is sized for: 1% of positions
REQUIRED_POWER = 0.99      # the chance an eval must have of catching it
FULL_ROW_SHARE = 4         # as trainer.eval_stage.FULL_ROW_SHARE (a test keeps the two equal)
FLOOR_ENV = "AUTORESEARCH_PROBE_FLOOR"  # daemon-set: "1" = refuse an eval below the floor
EXIT_PROBE_POWER = 18      # the eval stage refused: too few rows for the probe (the daemon: infra_error)


def row_detection(peek_share: float = PEEK_SHARE, vocab_size: int = 0,
                  full_row_share: int = FULL_ROW_SHARE) -> float:
    """q: the chance that one probed row catches a one-token look-ahead at `peek_share` of its positions
    (vocab_size 0: ignore the 1/vocab chance that the random token equals the original)."""
    if not 0.0 <= peek_share <= 1.0:
        raise ValueError(f"peek_share must be in [0, 1], got {peek_share}")
    same_token = 1.0 / vocab_size if vocab_size > 0 else 0.0
    return (1.0 - 1.0 / full_row_share) * peek_share * (1.0 - same_token)


def detection_probability(rows: int, peek_share: float = PEEK_SHARE, vocab_size: int = 0,
                          full_row_share: int = FULL_ROW_SHARE) -> float:
    """P(R) = 1 - (1 - q)^R: the chance that an eval of `rows` probed rows catches the look-ahead."""
    q = row_detection(peek_share, vocab_size, full_row_share)
    return 1.0 - (1.0 - q) ** max(rows, 0)


def rows_needed(peek_share: float = PEEK_SHARE, power: float = REQUIRED_POWER, vocab_size: int = 0,
                full_row_share: int = FULL_ROW_SHARE) -> int:
    """The fewest probed rows with detection_probability >= power."""
    q = row_detection(peek_share, vocab_size, full_row_share)
    if q <= 0.0:
        raise ValueError("a look-ahead at no position cannot be caught: peek_share must be > 0")
    if q >= 1.0:
        return 1
    rows = math.ceil(math.log(1.0 - power) / math.log(1.0 - q))
    while detection_probability(rows - 1, peek_share, vocab_size, full_row_share) >= power and rows > 1:
        rows -= 1  # rounding of the logarithms: the smallest count that reaches the power
    return rows


@dataclass(frozen=True)
class PowerVerdict:
    """The probe's power for one eval; `refused` when the daemon asked for the floor and it is not reached."""

    rows: int
    power: float
    needed_rows: int
    floor_required: bool
    line: str

    @property
    def trust_check(self) -> bool:
        return self.power >= REQUIRED_POWER

    @property
    def refused(self) -> bool:
        return self.floor_required and not self.trust_check

    def record(self) -> dict[str, object]:
        """What result.json keeps: the power and whether this eval is a trust check of causality."""
        return {"probe_power": round(self.power, 6), "trust_check": self.trust_check}


def probe_power_verdict(rows: int, seq_len: int, vocab_size: int, env: Mapping[str, str]) -> PowerVerdict:
    """The eval stage's check of the rows it is about to score (env: its own, daemon-set environment)."""
    power = detection_probability(rows, vocab_size=vocab_size)
    needed = rows_needed(vocab_size=vocab_size)
    required = env.get(FLOOR_ENV, "").strip() == "1"
    head = (f"probe power: {rows} probed rows catch a one-token look-ahead at {PEEK_SHARE:.0%} of positions "
            f"with probability {power:.4f}")
    if power >= REQUIRED_POWER:
        line = f"{head} (>= {REQUIRED_POWER}: a trust check)"
    elif required:
        line = (f"refusing to score: {head}, under the {REQUIRED_POWER} floor; score at least {needed} rows "
                f"(AUTORESEARCH_EVAL_TOKENS >= {needed * seq_len}) on a val split that holds them")
    else:
        line = (f"{head} (< {REQUIRED_POWER}): this eval checks the code path only, it is NOT a trust check "
                f"(a trust check needs {needed} rows)")
    return PowerVerdict(rows, power, needed, required, line)
