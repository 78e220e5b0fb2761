"""Slurm job states and how a finished stage maps onto a `RunStatus`.

There is no slurmdbd here, so `sacct` has nothing to read: a job's state comes from `scontrol show job`
while slurmctld remembers it (MinJobAge), else from the job-completion log (jobcomp/filetxt), and the
stage's own facts (exit code, OOM flag, the exact time limit) from the status file the batch script writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sandbox.spec import RunStatus

ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
    "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD",
})
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
    "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED",
})
# States that mean "Slurm put the job back in its queue": it will run again, which we never allow.
REQUEUED_STATES = frozenset({"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
_PAIR = re.compile(r"(\w+)=(\S*)")


@dataclass(frozen=True)
class JobInfo:
    """What Slurm says about one job."""

    job_id: str
    state: str  # base state, upper case: "RUNNING", "CANCELLED" (never "CANCELLED by 0")
    reason: str = ""
    exit_code: str = ""  # "<code>:<signal>"
    restarts: int = 0
    source: str = "scontrol"  # scontrol | jobcomp

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def requeued(self) -> bool:
        return self.state in REQUEUED_STATES or self.restarts > 0


def parse_pairs(line: str) -> dict[str, str]:
    """`Key=Value` pairs of one `scontrol -o` or jobcomp line (values without spaces)."""
    return dict(_PAIR.findall(line))


def job_info_from_line(line: str, source: str) -> JobInfo | None:
    pairs = parse_pairs(line)
    if "JobId" not in pairs or "JobState" not in pairs:
        return None
    restarts = pairs.get("Restarts", "0")
    return JobInfo(job_id=pairs["JobId"], state=pairs["JobState"].split()[0].upper(), reason=pairs.get("Reason", ""),
                   exit_code=pairs.get("ExitCode", ""), restarts=int(restarts) if restarts.isdigit() else 0,
                   source=source)


@dataclass(frozen=True)
class StageStatus:
    """The batch script's status file: when the container ran, how it ended, and what went wrong."""

    phase: str = ""  # done | start-failed | killed | "" (the script never finished)
    started: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    oom: bool = False
    timed_out: bool = False
    lost_wait: bool = False
    error: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def wall_seconds(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return max(0.0, self.ended - self.started)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def parse_status(text: str) -> StageStatus:
    """Parse `key=value` lines written by the batch script (unknown keys are kept in `extra`)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    exit_code, oom = None, False
    state = values.pop("state", "").split()
    if len(state) == 2 and state[0].lstrip("-").isdigit():
        exit_code, oom = int(state[0]), state[1] == "true"
    return StageStatus(phase=values.pop("phase", ""), started=_number(values.pop("started", None)),
                       ended=_number(values.pop("ended", None)), exit_code=exit_code, oom=oom,
                       timed_out=values.pop("timed_out", "") == "1", lost_wait=values.pop("lost_wait", "") == "1",
                       error=values.pop("error", ""), extra=values)


def stage_outcome(info: JobInfo | None, status: StageStatus | None) -> tuple[RunStatus, str]:
    """How a stage ended that the daemon did not cancel: Slurm's verdict first, then the container's."""
    state = info.state if info is not None else ""
    if state in ("TIMEOUT", "DEADLINE"):
        return RunStatus.TIMEOUT, f"Slurm ended the job at its time limit ({state})"
    if state == "PREEMPTED":
        return RunStatus.PREEMPTED, "Slurm preempted the job (a higher-priority job took its resources)"
    if state == "OUT_OF_MEMORY":
        return RunStatus.OOM, "Slurm killed the job at its memory limit"
    if state == "CANCELLED":
        return RunStatus.PREEMPTED, "the job was cancelled outside the daemon (scancel by an administrator?)"
    if state in ("NODE_FAIL", "BOOT_FAIL", "REVOKED", "SPECIAL_EXIT"):
        return RunStatus.INFRA_ERROR, f"Slurm ended the job with {state} ({info.reason if info else ''})"
    if status is None or status.phase == "":
        return RunStatus.INFRA_ERROR, f"the job ended ({state or 'state unknown'}) without finishing the stage script"
    if status.phase == "start-failed":
        return RunStatus.INFRA_ERROR, f"the container did not start on {status.extra.get('node', 'the node')}: {status.error}"
    if status.phase != "done":
        return RunStatus.INTERRUPTED, f"the stage script was stopped by a signal (phase {status.phase})"
    if status.lost_wait:
        return RunStatus.INFRA_ERROR, "the node's docker engine stopped answering while the stage ran"
    if status.timed_out:
        return RunStatus.TIMEOUT, ""
    if status.oom:
        return RunStatus.OOM, ""
    if status.exit_code is None:
        return RunStatus.INFRA_ERROR, "the node's docker engine reported no exit code"
    return (RunStatus.OK if status.exit_code == 0 else RunStatus.FAILED), ""
