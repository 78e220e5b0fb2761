"""Helpers of the agent tests: a recording clock, an in-memory call sink, a proposal context on the baseline."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from daemon.agents import ProposalContext
from daemon.store.records import AgentCallRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
# The real baseline train.py with MATRIX_LR pinned, so that the tests' edits do not follow its tuning.
BASELINE, _pinned = re.subn(r"^MATRIX_LR = [0-9.e-]+", "MATRIX_LR = 0.02",
                            (REPO_ROOT / "trainer" / "train.py").read_text(), count=1, flags=re.MULTILINE)
assert _pinned == 1, "trainer/train.py has no MATRIX_LR constant"
PROGRAM_MD = (REPO_ROOT / "program.md").read_text()


class RecordingClock:
    """Real wall time plus whatever was 'slept'; sleeping only records the wait, so retries run at once."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return datetime.now(timezone.utc) + timedelta(seconds=sum(self.sleeps))

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


class MemorySink:
    """The AgentCallSink protocol over a list, with calls timestamped like the store does."""

    def __init__(self) -> None:
        self.calls: list[tuple[datetime, AgentCallRecord]] = []

    def record_agent_call(self, record: AgentCallRecord) -> AgentCallRecord:
        self.calls.append((datetime.now(timezone.utc), record))
        return record

    def cost_since(self, since: datetime) -> float:
        return sum(record.cost_usd for at, record in self.calls if at >= since)

    @property
    def records(self) -> list[AgentCallRecord]:
        return [record for _, record in self.calls]


def make_context(**overrides: Any) -> ProposalContext:
    fields: dict[str, Any] = {
        "session_id": 1, "program_md": PROGRAM_MD, "best_source": BASELINE, "best_id": 1,
        "best_val_bpb": 1.25, "baseline_val_bpb": 1.25, "history": (), "seen_hashes": frozenset(), "crash": None,
    }
    fields.update(overrides)
    return ProposalContext(**fields)


LOG = "step 00010 (50.0%) | loss 3.2100 | 1.0 s\nstep 00020 (100.0%) | loss 2.9876 | 2.0 s\n---\n"
METRICS = {"training_seconds": 10.0, "total_tokens_m": 2.0, "num_steps": 20, "mfu_percent": 12.5,
           "peak_vram_mb": 3000.0, "log_tail": LOG}


def run_experiment(store: Any, session_id: int, kind: str, status: str, *, parent: int | None = None,
                   val_bpb: float | None = None, description: str = "", diff: str = "", lane: str = "gpu0",
                   source: str | None = None, source_hash: str | None = None, hypothesis: str = "",
                   **fields: Any) -> Any:
    """One experiment taken through the store's real transitions to `status` (or left queued/running)."""
    record = store.create_experiment(session_id, kind, source if source is not None else
                                     BASELINE + f"\n# {description} {kind}\n", parent_id=parent,
                                     description=description, diff=diff, hypothesis=hypothesis,
                                     source_hash=source_hash or f"h{description}{kind}")
    if status == "queued":
        return record
    claimed = store.claim_next(session_id, "test", lane, None, 60)
    assert claimed is not None and claimed.id == record.id
    if status == "running":
        return claimed
    values = {**METRICS, **fields}
    if val_bpb is not None:
        values["val_bpb"] = val_bpb
        store.transition(record.id, "running", "evaluating")
        return store.transition(record.id, "evaluating", status, **values)
    return store.transition(record.id, "running", status, **values)
