"""The interface every isolation backend implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sandbox.spec import Cancel, RunResult, RunSpec


@dataclass(frozen=True)
class ReapedRun:
    """A run found by the reaper: its labels, what was done with it, and its result when collected."""

    name: str
    labels: dict[str, str]
    action: str  # "collected" | "killed" | "removed"
    result: RunResult | None


class Backend(Protocol):
    """Runs a `RunSpec` to completion (or limit) and reports a `RunResult`; never raises for candidate faults."""

    name: str

    def run(self, spec: RunSpec, cancel: Cancel | None = None) -> RunResult: ...

    def reap(self, owner_alive: Callable[[str], bool]) -> list[ReapedRun]:
        """Reconcile leftovers carrying our labels; `owner_alive(owner_id)` says if their daemon still lives."""
        ...

    def active_pids(self) -> set[int]:
        """Host PIDs of every process of this backend's runs that are running now.

        The scheduler passes them to the GPU probe as our own, so our training never looks like a foreign job.
        """
        ...
