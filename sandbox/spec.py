"""What a sandbox run is asked to do (`RunSpec`) and what it reports back (`RunResult`).

These two types are the whole contract between the daemon and a backend: the daemon never talks to
Docker or to subprocesses directly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class RunStatus(str, enum.Enum):
    """How a run ended, as seen from outside the sandbox."""

    OK = "ok"  # exited 0 within the time limit
    FAILED = "failed"  # exited non-zero (crash, NaN fast-fail, refused split...)
    TIMEOUT = "timeout"  # killed by us at the wall-clock limit
    OOM = "oom"  # killed by the kernel at the memory limit
    PREEMPTED = "preempted"  # killed by us because a foreign job wanted the GPU
    INTERRUPTED = "interrupted"  # killed by us at shutdown or found orphaned by the reaper
    INFRA_ERROR = "infra_error"  # the sandbox itself failed (engine down, create refused...)


def exit_status(killed_as: RunStatus | None, oom: bool, exit_code: int | None) -> RunStatus:
    """How a finished run ended: our own kill reason first, then the kernel's OOM kill, then the exit code."""
    if killed_as is not None:
        return killed_as
    if oom:
        return RunStatus.OOM
    return RunStatus.OK if exit_code == 0 else RunStatus.FAILED


# Two identities for a stage that runs untrusted code beside trusted code (the eval stage: trainer.privsep).
SANDBOX_UID = 1000   # the trusted side (and every stage's only uid otherwise)
MODEL_UID = 1001     # the untrusted side of a split stage: no entry to PRIVATE_DIR
PRIVATE_DIR = "/scorer"  # a mode-0700 tmpfs owned by SANDBOX_UID in a split stage: mount what the untrusted side must not reach under it
OUT_TARGETS = ("/out", f"{PRIVATE_DIR}/out")  # where a stage's writable out dir is mounted
# A split train stage with Limits.work_bytes: the candidate writes this tmpfs of that size (its kernel-enforced
# quota, charged to the container's memory) instead of the out dir, which becomes the trusted side's alone.
WORK_DIR = "/work"
WORK_ENV = "AUTORESEARCH_WORK_DIR"  # read by trainer.layout: where the work tmpfs is mounted


@dataclass(frozen=True)
class Mount:
    """A host path made visible inside the sandbox; read-only unless `writable`."""

    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run. Memory is RAM + swap together (no swap beyond RAM)."""

    timeout_s: float = 600.0
    memory_bytes: int = 8 * 1024**3
    cpus: float = 2.0
    pids: int = 4096
    shm_bytes: int = 1024**3
    tmpfs_bytes: int = 2 * 1024**3
    output_tail_bytes: int = 64 * 1024
    out_file_max_bytes: int = 2 * 1024**3
    work_bytes: int = 0  # > 0: a split stage's untrusted side writes a tmpfs of this size (WORK_DIR), on top of memory


@dataclass(frozen=True)
class RunSpec:
    """One sandboxed command: an image (ignored by the local backend), mounts, env, limits, labels.

    `name` is deterministic (derived from experiment id, stage and attempt) so that a create retried
    after a daemon crash finds the container it already made instead of making a second one.
    """

    name: str
    command: tuple[str, ...]
    image: str = ""
    mounts: tuple[Mount, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    gpu_uuid: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    workdir: str = "/out"
    # Split identities (trainer.privsep): the stage starts as root with only SETUID/SETGID, runs its untrusted
    # part as MODEL_UID and its trusted part as SANDBOX_UID; PRIVATE_DIR is a tmpfs only SANDBOX_UID may enter.
    # Backends that cannot switch uids (local) run both parts as the caller's uid.
    split_identities: bool = False

    def check_mounts(self) -> None:
        """Refuse a spec whose mount sources are missing (a bug or a half-prepared run folder)."""
        from sandbox.errors import InvalidSpec

        for mount in self.mounts:
            if not mount.source.exists():
                raise InvalidSpec(f"{self.name}: mount source {mount.source} does not exist")

    def out_owner(self) -> tuple[int, int, bool]:
        """(uid, gid, shared) of the out dir (sandbox.outfiles.prepare_out_dir): in a split stage the candidate
        (MODEL_UID) writes it through its group beside the trusted side, with the sticky bit set."""
        return (SANDBOX_UID, MODEL_UID, True) if self.split_identities else (SANDBOX_UID, SANDBOX_UID, False)

    def out_mount(self) -> Mount:
        """The single writable mount (the run's out dir)."""
        writable = [m for m in self.mounts if m.writable]
        if len(writable) != 1:
            from sandbox.errors import InvalidSpec

            raise InvalidSpec(f"{self.name}: exactly one writable mount expected, found {len(writable)}")
        return writable[0]


@dataclass(frozen=True)
class RunResult:
    """The outcome of a run: status, exit code, wall time, a sanitized output tail, files read safely."""

    status: RunStatus
    exit_code: int | None
    wall_seconds: float
    output_tail: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    oom_killed: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.OK


class Cancel:
    """Asks a running sandbox to stop early, saying which status the run should end with.

    The daemon sets it on shutdown (INTERRUPTED) or when a foreign job claims the GPU (PREEMPTED);
    backends poll `reason` while they wait. The first reason set wins.
    """

    def __init__(self) -> None:
        self._reason: RunStatus | None = None

    def set(self, reason: RunStatus) -> None:
        if self._reason is None:
            self._reason = reason

    @property
    def reason(self) -> RunStatus | None:
        return self._reason
