"""What the store hands out: frozen records, the experiment kinds and statuses, and the allowed transitions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# remeasure: the current best run again with another seed (its recorded value is a mean of fresh runs)
KINDS = ("baseline", "noise", "candidate", "confirm", "manual", "remeasure")

ACTIVE_STATUSES = ("running", "evaluating")
TERMINAL_STATUSES = (
    "kept", "discarded", "measured", "invalid", "crashed", "timeout", "oom", "interrupted", "preempted",
)
STATUSES = ("queued", *ACTIVE_STATUSES, *TERMINAL_STATUSES)

# queued -> running happens only through claim_next, -> queued only through requeue_expired.
# queued -> interrupted cancels work that will never run (a confirmation whose session ended).
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"interrupted"}),
    "running": frozenset(
        {"evaluating", "crashed", "timeout", "oom", "invalid", "interrupted", "preempted"}
    ),
    "evaluating": frozenset(
        {"kept", "discarded", "measured", "invalid", "crashed", "timeout", "oom", "interrupted", "preempted"}
    ),
}

SESSION_OPEN = "open"


@dataclass(frozen=True)
class SessionRecord:
    id: int
    tag: str
    trigger: str
    program_md: str
    program_sha256: str
    config: dict[str, Any]
    status: str
    started_at: datetime
    ended_at: datetime | None


@dataclass(frozen=True)
class ExperimentRecord:
    id: int
    session_id: int
    parent_id: int | None
    kind: str
    lane: str | None
    gpu_uuid: str | None
    attempt: int
    seed: int
    status: str
    description: str
    hypothesis: str
    diff: str
    source: str
    source_sha256: str
    source_hash: str
    commit: str
    val_bpb: float | None
    training_seconds: float | None
    total_seconds: float | None
    peak_vram_mb: float | None
    mfu_percent: float | None
    total_tokens_m: float | None
    num_steps: int | None
    num_params_m: float | None
    depth: int | None
    eval_seconds: float | None
    probe: str
    exit_code: int | None
    oom: bool
    log_tail: str
    error: str
    lease_owner: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    verdict: dict[str, Any] | None = None  # the judge's numbers (Verdict.as_record)
    parent2_id: int | None = None  # a combine move's second parent
    sandbox_jobs: str | None = None  # the stages' sandbox handles (Slurm job ids), "train:1234 eval:1235"


@dataclass(frozen=True)
class AgentCallRecord:
    """One LLM request. Build it without `id`/`created_at`; `Store.record_agent_call` returns them filled."""

    provider: str
    model: str
    outcome: str = "ok"
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    error: str = ""
    session_id: int | None = None
    experiment_id: int | None = None
    id: int | None = field(default=None)
    created_at: datetime | None = field(default=None)


@dataclass(frozen=True)
class NoiseFloor:
    """Spread of repeated baseline runs. `mean` is None without samples; `std` (sample std) is 0.0 below 2."""

    mean: float | None
    std: float
    n: int
