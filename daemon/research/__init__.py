"""The research loop, in parts a newcomer can name (each its own module with its own tests):

- `session`      the session driver: lanes (one thread each), stop and grace period, leases, heartbeat;
- `planner`      what a free lane runs next: baseline, noise floor, re-measures of the best, candidates
                 and near-miss moves (pure functions over the session's rows);
- `work`         the planner's moves turned into queued experiments: the agent's candidates (rebased,
                 validated), near-miss moves, leftovers of earlier sessions;
- `proposer`     the agent asked ahead of time in a worker thread per lane (pipelining);
- `running`      one claimed experiment through the sandbox, its outcome, crash and push-back handling;
- `state`        what the session's parts share: the lock, experiments in flight, streaks, the fatal reason;
- `board`        the session's rows as its lanes see them: claims, leased transitions, leases, lane display;
- `briefing`     what the agent is shown before it proposes, and the refusal of a repeated idea;
- `judge`        the keep rule: a sequential one-sided t-test on means with pooled noise, simplicity and
                 memory rules; every verdict carries its numbers;
- `keeper`       records each measured run and carries out the judge's verdicts (commit, confirmations);
- `measurements` the runs the judge reads: repeats grouped by source, the best's runs and recorded mean;
- `archive`      near-misses with their diffs, re-applied onto a new best (search = archive);
- `lanes`        GPUs to lanes, and the gate that says whether a lane may launch;
- `stop`         when a session stops launching and when its running experiments are killed;
- `retest`       the morning proof: start best vs end best (and each keep vs its parent) on fresh paired seeds;
- `runner`       one experiment through the sandbox: train stage (candidate), eval stage (trusted harness);
- `replay`       the same source under another seed must not give a bit-identical result;
- `workspace`    the research workspace: program.md, the baseline train.py, its git repository;
- `corpus_check` the corpus-size rule of a GPU run (refuse data a night would read many times over);
- `ideas`        the line's idea memory: every change tried on any night, its outcome, effect and
                 measurement version; repeats refused before a run is spent;
- `ledger`, `line`, `environment`, `smoke`: the agent's ledger and notebook, research lines, the run's
                 environment facts, the smoke run.

`ResearchSession`, `SessionSummary`, `unified_diff` and `MAX_INVALID_PROPOSALS` are re-exported here,
loaded on first use so that the pure parts (judge, planner, measurements, archive) import without the
driver and its dependencies (the report and the status page read them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from daemon.research.session import MAX_INVALID_PROPOSALS, ResearchSession, SessionSummary, unified_diff

__all__ = ["MAX_INVALID_PROPOSALS", "ResearchSession", "SessionSummary", "unified_diff"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from daemon.research import session

        return getattr(session, name)
    raise AttributeError(f"module 'daemon.research' has no attribute {name!r}")
