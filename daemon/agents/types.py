"""The agents' vocabulary: what a proposal is (edits, a description), what the agent is shown (`ProposalContext`:
the best source, the ledger, the idea memory, a crash to fix) and the `Agent` interface.

A leaf of `daemon.agents`: every agent module imports these from here, and the package re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from daemon.clock import Clock as Clock  # re-exported: the time seam
from daemon.clock import SystemClock as SystemClock

if TYPE_CHECKING:
    from daemon.agents.ideas import IdeaMemory


@dataclass(frozen=True)
class Edit:
    """One search/replace block against train.py; `search == ""` means `replace` is the whole new file."""

    search: str
    replace: str


@dataclass(frozen=True)
class Proposal:
    description: str
    hypothesis: str
    edits: tuple[Edit, ...]
    source: str  # the candidate train.py, edits applied and validated
    notes: str = ""  # what the agent learned and wants to try next: written back to the line's notebook
    # An archived near-miss whose change is applied together with the edits (`base: "combine:<id>"`,
    # daemon.agents.combine); the experiment records it as its second parent. None: built on the best only.
    combine_with: int | None = None


@dataclass(frozen=True)
class HistoryItem:
    id: int
    status: str
    val_bpb: float | None
    delta: float | None  # val_bpb minus the best's val_bpb at the time; negative = better
    description: str


@dataclass(frozen=True)
class CrashInfo:
    experiment_id: int
    description: str
    status: str
    output_tail: str
    diff: str = ""  # the crashed candidate's diff against its parent, so a fix can redo the same idea
    smoke: bool = False  # caught by the seconds-long smoke run (no full run was spent; experiment_id is 0)


@dataclass(frozen=True)
class RunEntry:
    """One experiment of the research line as the ledger shows it: its own run and its bookkeeping runs
    (noise runs of a baseline, confirmations of a candidate) folded into one row; metrics from the trusted
    summary and eval of its first run."""

    id: int
    session_id: int
    kind: str
    status: str
    lane: str | None
    val_bpb: float | None  # the mean of its `runs` measured runs
    delta: float | None  # val_bpb minus its parent's recorded value when it ran (a mean, like "best"); negative = better
    num_steps: int | None = None
    tokens_per_s: float | None = None
    mfu_percent: float | None = None
    peak_vram_mb: float | None = None
    training_seconds: float | None = None
    final_loss: float | None = None
    verdict: str = ""  # the judge's numbers in one line, when it recorded them
    description: str = ""  # untrusted (written by the agent)
    error: str = ""  # why it failed (may quote sandbox output: untrusted)
    runs: int = 1  # measured runs folded into this row (its own, its confirmations or noise runs)
    t: float | None = None  # the judge's t, when it recorded one
    settled: bool = True  # no run of it is queued or running: the row will not change (cacheable)
    # The morning re-test's mark ("" when none): e.g. "did not hold" when a re-test could not reproduce a keep.
    # Filled by whoever records re-tests (`daemon.research.ledger.ledger_from_rows(retests=...)`).
    retest: str = ""


@dataclass(frozen=True)
class ChangeEntry:
    """A kept change or a near-miss, with its diff against its parent (untrusted text)."""

    id: int
    val_bpb: float | None
    delta: float | None
    description: str
    diff: str
    retest: str = ""  # a keep's morning re-test, when one ran: held, or did not hold (daemon.research.retest)


@dataclass(frozen=True)
class CrashEntry:
    id: int
    status: str
    description: str
    error: str
    output_tail: str


@dataclass(frozen=True)
class InFlight:
    """Work running or queued on a lane (this one or another) while the agent proposes."""

    experiment_id: int
    kind: str
    status: str
    lane: str | None
    description: str
    hypothesis: str = ""  # untrusted (written by the agent)
    diff: str = ""  # against its parent (untrusted)
    recorded: bool = True  # False: a proposal taken by its lane and not recorded as an experiment yet


@dataclass(frozen=True)
class LedgerView:
    """The research line as the agent reads it, oldest first, sized by the prompt (see daemon.agents.ledger_text).

    `runs` has one row per experiment (bookkeeping runs folded in); `runs_recorded` counts every run,
    `bookkeeping` the runs folded into other rows or into the best's recorded value, by kind.
    """

    nights: int  # sessions in the research line
    runs: tuple[RunEntry, ...]
    kept: tuple[ChangeEntry, ...]
    near_misses: tuple[ChangeEntry, ...]
    crashes: tuple[CrashEntry, ...]
    in_flight: tuple[InFlight, ...]
    noise_sigma: float | None
    noise_n: int
    keep_margin: float | None
    margin_rule: str  # how the margin follows from sigma, in words
    runs_recorded: int = 0
    bookkeeping: tuple[tuple[str, int], ...] = ()  # (kind, runs) folded: noise, confirm, remeasure
    session_ids: tuple[int, ...] = ()  # the line's sessions, oldest first (night n is session_ids[n - 1])


@dataclass(frozen=True)
class ProposalContext:
    session_id: int
    program_md: str
    best_source: str
    best_id: int | None
    best_val_bpb: float | None
    baseline_val_bpb: float | None
    history: tuple[HistoryItem, ...]
    seen_hashes: frozenset[str]
    crash: CrashInfo | None = None
    # Start of tonight's spending window for the cost cap; None = the last 24 hours.
    cost_since: datetime | None = None
    ledger: LedgerView | None = None  # the whole research line (the history above is its recent tail)
    environment: str = ""  # trusted facts: budget, preset, device, data size, the baseline's speed
    notebook: str = ""  # the agent's own notes from earlier proposals and nights (untrusted when shown)
    # The research line's secret fence id (daemon.agents.fences); None: a fresh one per prompt (no caching).
    fence_nonce: str | None = None
    ideas: IdeaMemory | None = None  # every change the line tried (daemon.agents.ideas); None: not checked
    refused: str = ""  # the last proposal, refused before it ran as a repeat of a tried idea (untrusted)


class Agent(Protocol):
    name: str

    def propose(self, ctx: ProposalContext) -> Proposal: ...
