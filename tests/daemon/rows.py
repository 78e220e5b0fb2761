"""Store records built in memory for the pure functions of the research package (planner, measurements, archive)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from daemon.store.records import ExperimentRecord

_EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(row_id: int, kind: str, status: str, val_bpb: float | None = None, *, source_hash: str = "",
        parent_id: int | None = None, **fields: Any) -> ExperimentRecord:
    """An experiments row as the store would hand it out (every other column at its empty value)."""
    values: dict[str, Any] = {
        "session_id": 1, "lane": "lane0", "gpu_uuid": None, "attempt": 1, "seed": 0, "description": "",
        "hypothesis": "", "diff": "", "source": "x = 1\n", "source_sha256": "", "commit": "",
        "training_seconds": None, "total_seconds": None, "peak_vram_mb": None, "mfu_percent": None,
        "total_tokens_m": None, "num_steps": None, "num_params_m": None, "depth": None, "eval_seconds": None,
        "probe": "", "exit_code": None, "oom": False, "log_tail": "", "error": "", "lease_owner": None,
        "lease_expires_at": None, "created_at": _EPOCH, "started_at": None, "finished_at": None,
    }
    values.update(fields)
    return ExperimentRecord(id=row_id, kind=kind, status=status, val_bpb=val_bpb, source_hash=source_hash,
                            parent_id=parent_id, **values)


def finished(store: Any, session_id: int, kind: str, source: str, val_bpb: float | None, *, status: str = "kept",
             parent_id: int | None = None, source_hash: str = "", diff: str = "", seed: int = 0,
             **fields: Any) -> ExperimentRecord:
    """A row of a real store measured by an earlier run (queued, claimed, evaluated, then `status`)."""
    created = store.create_experiment(session_id, kind, source, parent_id=parent_id, description=kind,
                                      source_hash=source_hash, diff=diff, seed=seed)
    claimed = store.claim_next(session_id, "earlier-owner", "lane0", None, 60.0)
    assert claimed is not None and claimed.id == created.id
    store.transition(created.id, "running", "evaluating", owner="earlier-owner")
    record: ExperimentRecord = store.transition(created.id, "evaluating", status, owner="earlier-owner",
                                                val_bpb=val_bpb, **fields)
    return record
