"""Two identities in one eval container: the trusted scorer and the untrusted model process.

The sandbox starts the eval stage as root with only CAP_SETUID/CAP_SETGID (no-new-privileges, every other
capability dropped) and names the two uids in AUTORESEARCH_PRIVSEP ("scorer_uid:model_uid"). The harness
first starts the model process under the model uid (trainer.model_process), then drops itself to the scorer
uid for good; only then does it read the val split and open its out dir, both under a folder that only the
scorer uid may enter (the sandbox mounts them in a mode-0700 tmpfs). With no AUTORESEARCH_PRIVSEP (local
backend, tests, benches) both processes keep the caller's uid: the process boundary stays, the file
boundary does not.
The train stage's harness stays root and runs the candidate as the model uid; at the candidate's exit or deadline
kill_uid ends every process of that uid before anything else happens (the train stage's clock: trainer.clock).
This module imports no torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PRIVSEP_ENV = "AUTORESEARCH_PRIVSEP"
KILL_ATTEMPTS = 200
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Identities:
    """The scorer's and the model process's uid (each uses its uid as its gid, with no supplementary groups)."""

    scorer_uid: int
    model_uid: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Identities | None:
        """The identities AUTORESEARCH_PRIVSEP names, or None when it is unset; ValueError when it is malformed."""
        raw = env.get(PRIVSEP_ENV, "").strip()
        if not raw:
            return None
        scorer, sep, model = raw.partition(":")
        if not (sep and scorer.isdigit() and model.isdigit()):
            raise ValueError(f"{PRIVSEP_ENV}={raw!r} is not 'scorer_uid:model_uid' (two decimal uids)")
        identities = cls(int(scorer), int(model))
        if 0 in (identities.scorer_uid, identities.model_uid) or identities.scorer_uid == identities.model_uid:
            raise ValueError(f"{PRIVSEP_ENV}={raw!r}: the two uids must differ and neither may be root (0)")
        return identities

    def model_popen(self) -> dict[str, Any]:
        """subprocess.Popen keywords that start a process as the model uid (gid = uid, no other group)."""
        return {"user": self.model_uid, "group": self.model_uid, "extra_groups": []}


def stage_identities(env: Mapping[str, str]) -> Identities | None:
    """The identities a stage must split into (None: keep the caller's uid); ValueError when the setting is
    malformed or this process cannot take them (it must run as root with CAP_SETUID)."""
    identities = Identities.from_env(env)
    if identities is not None and os.geteuid() != 0:
        raise ValueError(f"{PRIVSEP_ENV} is set but the stage runs as uid {os.geteuid()}, not root: the sandbox "
                         "must start it as root with CAP_SETUID and CAP_SETGID (sandbox.docker_backend does)")
    return identities


def become(uid: int) -> None:
    """Drop this process to `uid` (gid = uid, no supplementary groups) for good, and prove there is no way back."""
    become_quietly(uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
        raise RuntimeError(f"dropping to uid {uid} left ids {os.getresuid()}/{os.getresgid()}/{os.getgroups()}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError(f"after dropping to uid {uid} this process could become root again: refusing to go on")


def live_processes(uid: int) -> list[int]:
    """Pids of this PID namespace's processes that hold `uid` (real, effective or saved) and still run code
    (zombies excluded), from /proc; never this process."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as status:
                fields = dict(line.split(b":", 1) for line in status.read().splitlines() if b":" in line)
        except OSError:  # it exited while we looked
            continue
        uids = {int(value) for value in fields.get(b"Uid", b"").split()[:3] if value.isdigit()}
        if uid in uids and not fields.get(b"State", b"").strip().startswith(b"Z"):
            found.append(int(entry.name))
    return found


def _kill_as(uid: int) -> None:
    """In a forked child: become `uid`, SIGKILL every process that uid may signal, exit without cleanup."""
    code = 1
    try:
        become_quietly(uid)
        os.kill(-1, signal.SIGKILL)  # one pass under the kernel's task-list lock: a fork in flight dies too
        code = 0
    except BaseException:  # a forked child must reach _exit whatever happened
        pass
    finally:
        os._exit(code)


def become_quietly(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def kill_uid(uid: int, attempts: int = KILL_ATTEMPTS) -> bool:
    """Kill every process of `uid` in this PID namespace; True once /proc shows none left running.

    A forked helper takes the candidate's uid and calls kill(-1, SIGKILL), which reaches every process of that
    uid at once, however it detached itself (setsid, double fork); as root the same call would also hit this
    harness. The loop covers a helper the candidate killed first (it shares the uid) and the pids limit bounds
    any fork race. Needs CAP_SETUID (the split stage's root)."""
    for _ in range(attempts):
        pid = os.fork()
        if pid == 0:
            _kill_as(uid)
        os.waitpid(pid, 0)
        if not live_processes(uid):
            return True
        time.sleep(0.01)
    return not live_processes(uid)


def reap_orphans() -> None:
    """Collect the exit status of every dead child (the candidate's orphans come to a subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def become_subreaper() -> None:
    """Orphans of the candidate's processes come to this process, not to the container's PID 1 (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
