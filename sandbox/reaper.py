"""Reconcile containers left by a crashed or killed daemon, scoped to one daemon instance.

Only containers labelled with this backend's instance are touched, so two daemons (or two test
sessions) sharing one Docker engine never reap each other's runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors

from sandbox import labels as L
from sandbox.base import ReapedRun
from sandbox.docker_backend import _kill_and_wait, collect_result
from sandbox.spec import OUT_TARGETS, Limits, RunStatus

_RUNNING_STATES = ("running", "paused", "restarting")
_FINISHED_STATES = ("exited", "dead")


def _out_dir(container: Any) -> Path | None:
    for mount in container.attrs.get("Mounts", []):
        if mount.get("Destination") in OUT_TARGETS and mount.get("RW"):
            return Path(mount["Source"])
    return None


def _wall_seconds(container: Any) -> float:
    """Seconds the container ran, from the engine's timestamps (0 when it never started)."""
    from datetime import datetime

    state = container.attrs.get("State", {})

    def parse(stamp: str) -> float | None:
        if not stamp or stamp.startswith("0001-"):
            return None
        return datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()

    begin, end = parse(state.get("StartedAt", "")), parse(state.get("FinishedAt", ""))
    if begin is None:
        return 0.0
    return max(0.0, (end if end is not None else time.time()) - begin)


def reap_containers(client: Any, instance: str, owner_alive: Callable[[str], bool]) -> list[ReapedRun]:
    """Collect finished runs, kill runs whose owner is gone (interrupted), remove everything unknown."""
    reaped: list[ReapedRun] = []
    containers = client.containers.list(all=True, filters={"label": f"{L.INSTANCE}={instance}"})
    for container in containers:
        labels = dict(container.labels)
        owner = labels.get(L.OWNER, "")
        known = bool(owner) and L.EXPERIMENT in labels and L.STAGE in labels
        out_dir = _out_dir(container)
        if container.status in _RUNNING_STATES and known and owner_alive(owner) and not L.past_deadline(labels):
            continue  # a live daemon's run within its deadline: not ours to touch
        try:
            if not known or out_dir is None or container.status not in (*_RUNNING_STATES, *_FINISHED_STATES):
                reaped.append(ReapedRun(container.name, labels, "removed", None))
                continue
            killed_as = None
            if container.status in _RUNNING_STATES:
                _kill_and_wait(container)
                killed_as = RunStatus.INTERRUPTED
            result = collect_result(container, out_dir, Limits().output_tail_bytes, _wall_seconds(container),
                                    killed_as)
            reaped.append(ReapedRun(container.name, labels, "killed" if killed_as else "collected", result))
        finally:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
    return reaped
