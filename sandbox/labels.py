"""The labels every sandbox run carries, so the reaper can find and attribute leftovers.

An owner id is `<instance>:<pid>-<start ticks>-<boot id>-<random>`: unique to one daemon process for all time
(a reused PID has another start time; a reboot another boot id; the random part tells apart processes in
different PID namespaces). Whether an owner still runs is asked of the daemon lock (`daemon.service.lock`), which
holds the owner id independent of PIDs; `owner_alive_here` is the PID-based fallback for this namespace.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from pathlib import Path

INSTANCE = "autoresearch.instance"
OWNER = "autoresearch.owner"
EXPERIMENT = "autoresearch.experiment"
STAGE = "autoresearch.stage"
ATTEMPT = "autoresearch.attempt"
DEADLINE = "autoresearch.deadline"  # unix time after which the run must be dead, whoever owns it


def boot_id() -> str:
    """This kernel's boot id (first 8 hex digits), or '' where /proc does not have it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return ""


def start_ticks(pid: int) -> str:
    """The process' start time in clock ticks since boot (/proc/<pid>/stat field 22), or '' if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@functools.cache
def _process_token(pid: int) -> str:
    return f"{pid}-{start_ticks(pid) or 0}-{boot_id() or 'noboot'}-{uuid.uuid4().hex[:8]}"


def owner_id(instance: str, pid: int | None = None) -> str:
    """`<instance>:<pid>-<start>-<boot>-<random>` of this process (or `<instance>:<pid>` for another pid)."""
    if pid is not None and pid != os.getpid():
        return f"{instance}:{pid}"
    return f"{instance}:{_process_token(os.getpid())}"


DEADLINE_MARGIN_S = 30.0  # past the daemon's own timeout: the daemon normally kills (and records) the run first


def deadline_command(command: list[str], timeout_s: float) -> list[str]:
    """`command` under coreutils `timeout`: TERM at timeout + margin, KILL 10 s later (exit 124 or 137)."""
    return ["timeout", "--kill-after=10", f"{int(timeout_s + DEADLINE_MARGIN_S) + 1}", *command]


def wrapper_could_not_exec(exit_code: int | None, output: str) -> bool:
    """The deadline wrapper could not start the command (126/127 and its one message): an infra error."""
    return exit_code in (126, 127) and output.lstrip().startswith("timeout: failed to run command")


def past_deadline(labels: dict[str, str], now: float | None = None) -> bool:
    """Whether a run's deadline label lies in the past (a run without one has none)."""
    value = labels.get(DEADLINE, "")
    return value.isdigit() and (time.time() if now is None else now) > int(value)


def deadline_label(timeout_s: float, margin_s: float) -> str:
    """The absolute deadline of a run that starts now and may last `timeout_s` (+ margin): unix seconds."""
    return str(int(time.time() + timeout_s + margin_s) + 1)


def run_labels(instance: str, experiment_id: int, stage: str, attempt: int) -> dict[str, str]:
    return {
        INSTANCE: instance,
        OWNER: owner_id(instance),
        EXPERIMENT: str(experiment_id),
        STAGE: stage,
        ATTEMPT: str(attempt),
    }


def owner_alive_here(owner: str) -> bool:
    """Whether `owner` names a process that still runs in this PID namespace (the PID-based fallback).

    A token's start time and boot id must match too, so a reused PID or a reboot reads as dead.
    """
    token = owner.rpartition(":")[2]
    if token == _process_token(os.getpid()):
        return True
    parts = token.split("-")
    if not parts[0].isdigit():
        return False
    pid = int(parts[0])
    if len(parts) == 1:  # legacy `<instance>:<pid>`
        return pid == os.getpid() or _exists(pid)
    if len(parts) != 4:
        return False
    _pid, started, booted, _random = parts
    if booted != (boot_id() or "noboot") or not _exists(pid):
        return False
    return start_ticks(pid) == started


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
