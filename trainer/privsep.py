"""Two identities in one eval container: the trusted scorer and the untrusted model process.

The sandbox starts the eval stage as root with only CAP_SETUID/CAP_SETGID (no-new-privileges, every other
capability dropped) and names the two uids in AUTORESEARCH_PRIVSEP ("scorer_uid:model_uid"). The harness
first starts the model process under the model uid (trainer.model_process), then drops itself to the scorer
uid for good; only then does it read the val split and open its out dir, both under a folder that only the
scorer uid may enter (the sandbox mounts them in a mode-0700 tmpfs). With no AUTORESEARCH_PRIVSEP (local
backend, tests, benches) both processes keep the caller's uid: the process boundary stays, the file
boundary does not.
This module imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PRIVSEP_ENV = "AUTORESEARCH_PRIVSEP"


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
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
        raise RuntimeError(f"dropping to uid {uid} left ids {os.getresuid()}/{os.getresgid()}/{os.getgroups()}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise RuntimeError(f"after dropping to uid {uid} this process could become root again: refusing to go on")
