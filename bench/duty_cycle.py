"""Duty cycle of a lane: the idle gap between consecutive runs and the share of wall time spent training.

The real research loop (`daemon.research.ResearchSession`, real SQLite store, real git workspace) runs
with two stand-ins at its edges: an agent that answers after L seconds (the LLM) and a runner whose
"training" sleeps for the budget B (the GPU). Pipelined (proposal prepared while the lane trains) and
serial (ask, then train) are measured side by side. `--keep` lets the judge keep improvements: each
keep then makes the prepared proposal stale, and this agent's edits always conflict with the new best
(same line), so it is re-asked and that gap is one agent latency (the worst case for rebasing).

    python bench/duty_cycle.py [--latency 2] [--budget 5] [--experiments 6]
"""

from __future__ import annotations

import argparse
import itertools
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.agents import Edit, Proposal, ProposalContext
from daemon.config import load_settings
from daemon.research import ResearchSession
from daemon.research.lanes import Lane
from daemon.research.stop import StopCondition
from daemon.research.workspace import Workspace
from daemon.store import open_store
from sandbox.spec import RunResult, RunStatus

BASELINE = "import os\nLR = 0\nos.environ.get('AUTORESEARCH_TIME_BUDGET')\nexport_checkpoint = print\nexport_checkpoint()\n"


class SlowAgent:
    """Answers after `latency` seconds with a new learning-rate value (the LLM stand-in)."""

    name = "bench"

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.count = 0
        self.lock = threading.Lock()

    def propose(self, ctx: ProposalContext) -> Proposal:
        time.sleep(self.latency)
        with self.lock:
            self.count += 1
            value = self.count
        line = next(line for line in ctx.best_source.splitlines() if line.startswith("LR = "))
        edit = Edit(line, f"LR = {value}{random.randrange(10**6)}")
        return Proposal(f"LR {value}", "bench", (edit,), ctx.best_source.replace(line, edit.replace))


@dataclass
class _Outcome:
    status: str
    val_bpb: float | None
    summary: dict[str, float]
    train: RunResult
    eval: RunResult | None
    probe: str = "passed"
    error: str = ""
    log_tail: str = ""
    eval_seconds: float = 0.0
    overhead_seconds: dict[str, float] = field(default_factory=dict)


class SleepingRunner:
    """Train = sleep for the budget (the GPU stand-in); records when each run started and ended."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.spans: list[tuple[float, float]] = []

    def run(self, experiment_id: int, attempt: int, source: str, seed: int, gpu_uuid: str | None = None,
            cancel: Any = None, on_stage: Any = None) -> _Outcome:
        start = time.monotonic()
        if on_stage is not None:
            on_stage("train")
        time.sleep(self.budget)
        if on_stage is not None:
            on_stage("eval")
        self.spans.append((start, time.monotonic()))
        result = RunResult(RunStatus.OK, 0, self.budget)
        return _Outcome("ok", 1.0 + random.random() * 0.01, {"training_seconds": self.budget}, result, result)


def measure(pipelined: bool, latency: float, budget: float, experiments: int,
            keep: bool) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        workspace = Workspace.init(root / "ws", baseline_source=BASELINE)
        judge = {"noise_runs": 0, "min_delta": 0.0 if keep else 1.0}
        settings = load_settings(None, workspace=workspace.root, judge=judge)
        store = open_store(f"sqlite:///{root / 'bench.db'}")
        store.upgrade()
        runner = SleepingRunner(budget)
        session = ResearchSession(settings=settings, store=store, workspace=workspace, runner=runner,
                                  agent=SlowAgent(latency), lanes=[Lane("cpu", None)], owner="bench:1",
                                  max_experiments=experiments, pipelined=pipelined)
        session.open()
        started = time.monotonic()
        session.run(StopCondition(grace_s=60))
        wall = time.monotonic() - started
    spans = runner.spans[1:]  # the baseline needs no proposal; gaps are measured between candidates
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    inside = sum(end - start for start, end in runner.spans)
    return max(gaps), sum(gaps) / len(gaps), inside / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=2.0, help="agent latency L, seconds")
    parser.add_argument("--budget", type=float, default=5.0, help="training budget B, seconds")
    parser.add_argument("--experiments", type=int, default=6)
    parser.add_argument("--keep", action="store_true", help="let the judge keep improvements (rebase worst case)")
    args = parser.parse_args()
    print(f"L = {args.latency:g} s, B = {args.budget:g} s, {args.experiments} candidates + baseline per mode")
    print(f"{'mode':<10} {'max gap s':>10} {'mean gap s':>11} {'training share':>15}")
    for pipelined in (True, False):
        worst, mean, share = measure(pipelined, args.latency, args.budget, args.experiments, args.keep)
        print(f"{'pipelined' if pipelined else 'serial':<10} {worst:>10.3f} {mean:>11.3f} {share:>14.1%}")


if __name__ == "__main__":
    main()
