"""The labels every sandbox run carries, so the reaper can find and attribute leftovers."""

from __future__ import annotations

import os

INSTANCE = "autoresearch.instance"
OWNER = "autoresearch.owner"
EXPERIMENT = "autoresearch.experiment"
STAGE = "autoresearch.stage"
ATTEMPT = "autoresearch.attempt"


def owner_id(instance: str, pid: int | None = None) -> str:
    """`<instance>:<pid>`: the daemon process that owns a run."""
    return f"{instance}:{os.getpid() if pid is None else pid}"


def run_labels(instance: str, experiment_id: int, stage: str, attempt: int) -> dict[str, str]:
    return {
        INSTANCE: instance,
        OWNER: owner_id(instance),
        EXPERIMENT: str(experiment_id),
        STAGE: stage,
        ATTEMPT: str(attempt),
    }


def owner_alive_here(owner: str) -> bool:
    """Whether `owner` names a process that still runs on this host (the default reaper policy)."""
    _, _, pid_text = owner.rpartition(":")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
