"""The train stage's one clock (trusted, no torch): every second from the harness's spawn of the candidate counts.

Every candidate gets the same wall-clock: the compile allowance C (AUTORESEARCH_COMPILE_BUDGET: imports, set-up,
compilation, export) plus the training budget B (AUTORESEARCH_TIME_BUDGET), plus a slack of SLACK_FRACTION x B
(at least SLACK_MIN_SECONDS) for the last step of an honest run that aimed at C + B. The harness tells the
candidate the deadline to aim at (DEADLINE_ENV: C + B after the spawn, as a CLOCK_MONOTONIC reading, the clock
every process of the container shares) and, at C + B + slack, kills every process of the candidate: a candidate
still running then is over budget and never scored. Nothing the candidate prints moves either deadline (the
marker lines of trainer.layout are informational), and nothing it leaves behind runs once the stage ends
(trainer.privsep.kill_uid), so it cannot buy time before a start line, after an export line or after its exit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEADLINE_ENV = "AUTORESEARCH_DEADLINE"  # the candidate's target: time.monotonic() value by which it must be done
SLACK_FRACTION = 0.02
SLACK_MIN_SECONDS = 1.0
DEFAULT_COMPILE_BUDGET = 120.0


@dataclass(frozen=True)
class TimeRules:
    """The stage's deadlines in seconds after the spawn, from the environment the daemon set (never the candidate)."""

    budget_s: float
    compile_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TimeRules | None:
        raw = env.get("AUTORESEARCH_TIME_BUDGET", "").strip()
        if not raw:
            return None  # a bare developer run: nothing to enforce
        try:
            budget = float(raw)
            compile_budget = float(env.get("AUTORESEARCH_COMPILE_BUDGET", "") or DEFAULT_COMPILE_BUDGET)
        except ValueError:
            raise ValueError(f"AUTORESEARCH_TIME_BUDGET/COMPILE_BUDGET are not numbers ({raw!r})") from None
        if not (0 < budget < 1e6 and 0 <= compile_budget < 1e6):
            raise ValueError(f"AUTORESEARCH_TIME_BUDGET={raw!r} is not a positive number of seconds")
        return cls(budget, compile_budget)

    @property
    def target_s(self) -> float:
        """When the candidate should be done (exported and exited): the allowance plus the budget."""
        return self.compile_s + self.budget_s

    @property
    def slack_s(self) -> float:
        return max(SLACK_MIN_SECONDS, SLACK_FRACTION * self.budget_s)

    @property
    def hard_s(self) -> float:
        """When every process of the candidate is killed and the stage is over budget."""
        return self.target_s + self.slack_s

    def describe(self) -> str:
        return (f"compile allowance {self.compile_s:g} s + budget {self.budget_s:g} s + slack {self.slack_s:.1f} s "
                f"= {self.hard_s:.1f} s from the candidate's start")
