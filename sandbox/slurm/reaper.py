"""Reconcile the Slurm jobs a crashed or killed daemon left, scoped to one daemon instance.

The job folders under `<shared_dir>/jobs/` are the record of what was submitted (their `meta.json` names
the job id, labels and out dir), as containers are for the docker reaper; the queue is searched too, by the
labels in each job's comment, for a job whose folder is gone.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import labels as L
from sandbox import treewalk
from sandbox.base import ReapedRun
from sandbox.outfiles import read_out_files
from sandbox.slurm.commands import SlurmCommandError
from sandbox.slurm.states import FINAL_STATES
from sandbox.spec import Limits, RunStatus

if TYPE_CHECKING:
    from sandbox.slurm.backend import SlurmBackend


def _meta(job_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((job_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def reap_jobs(backend: SlurmBackend, owner_alive: Callable[[str], bool]) -> list[ReapedRun]:
    """Finished: collect; active without a live owner: cancel and record `interrupted`; unknown: cancel/remove."""
    from sandbox.slurm.backend import parse_comment

    reaped: list[ReapedRun] = []
    seen_jobs: set[str] = set()
    folders = sorted(p for p in backend.jobs_dir.glob("*") if p.is_dir() and not p.name.startswith(".")) \
        if backend.jobs_dir.is_dir() else []
    for job_dir in folders:
        meta = _meta(job_dir)
        if meta is not None and meta.get("instance") != backend.instance:
            continue  # another daemon's job (several daemons may share one shared directory)
        if meta is None:
            reaped.append(ReapedRun(job_dir.name, {}, "removed", None))
            treewalk.remove_tree(job_dir)
            continue
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        job_id = str(meta.get("job_id") or "")
        seen_jobs.add(job_id)
        result = _reap_one(backend, job_dir, meta, labels, job_id, owner_alive)
        if result is not None:
            reaped.append(result)
    with contextlib.suppress(SlurmCommandError):
        for job in backend.client.queue():
            labels = parse_comment(job.comment)
            if labels.get(L.INSTANCE) != backend.instance or job.job_id in seen_jobs or job.state in FINAL_STATES:
                continue
            # In the queue with our labels but no folder: nothing to collect it into. Cancel it.
            backend.client.cancel(job.job_id)
            reaped.append(ReapedRun(job.name, labels, "removed", None))
    return reaped


def _reap_one(backend: SlurmBackend, job_dir: Path, meta: dict[str, Any], labels: dict[str, str], job_id: str,
              owner_alive: Callable[[str], bool]) -> ReapedRun | None:
    from sandbox.slurm.backend import _read_status, _read_tail
    from sandbox.slurm.states import stage_outcome
    from sandbox.spec import RunResult
    from sandbox.tail import sanitize_tail

    owner = labels.get(L.OWNER, "")
    name = str(meta.get("name") or job_dir.name)
    try:
        info = backend.client.job(job_id) if job_id else None
    except SlurmCommandError:
        return None  # the controller does not answer: leave the folder for the next start-up
    active = info is not None and not info.final
    if active and owner and owner_alive(owner):
        return None  # a live daemon's stage: not ours to touch
    killed_as = None
    if active:
        info = backend._cancel_and_wait(job_id)
        killed_as = RunStatus.INTERRUPTED
    elif not job_id:
        treewalk.remove_tree(job_dir)  # never submitted (the daemon died before sbatch answered)
        return ReapedRun(name, labels, "removed", None)
    status = _read_status(job_dir)
    outcome, note = (killed_as, "") if killed_as is not None else stage_outcome(info, status)
    out_dir = Path(str(meta.get("out_dir") or ""))
    out = read_out_files(out_dir) if out_dir.is_dir() else None
    tail_bytes = int(meta.get("tail_bytes") or Limits().output_tail_bytes)
    result = RunResult(
        status=outcome,
        exit_code=status.exit_code if status is not None else None,
        wall_seconds=(status.wall_seconds or 0.0) if status is not None else 0.0,
        output_tail=sanitize_tail(_read_tail(job_dir), tail_bytes),
        files=out.files if out is not None else {},
        oom_killed=bool(status is not None and status.oom),
        error=f"slurm job {job_id}: {note}" if note else "",
    )
    treewalk.remove_tree(job_dir)
    return ReapedRun(name, labels, "killed" if killed_as else "collected", result)
