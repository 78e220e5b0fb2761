"""Start-up reconciliation: after a crash or a restart, make the database and the sandbox agree again.

Order matters: migrate first; reap labelled sandbox runs whose owning daemon is gone; mark this
instance's orphaned `running`/`evaluating` rows `interrupted` (their process is dead, so they can
never finish); only then put other owners' rows whose lease expired back in the queue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.ops.logs import get_logger
from sandbox.base import Backend
from sandbox.labels import owner_alive_here

log = get_logger("autoresearch.reconcile")


@dataclass(frozen=True)
class Reconciled:
    reaped: tuple[str, ...]  # sandbox run names and what was done ("name: killed")
    interrupted: tuple[int, ...]  # experiment ids of this instance's dead daemons
    requeued: tuple[int, ...]  # experiment ids whose lease had expired


def reconcile(store: Any, backend: Backend | None, instance: str,
              owner_alive: Callable[[str], bool] = owner_alive_here) -> Reconciled:
    """`owner_alive` says whether an owner id still runs: the daemon lock's holder check (survives PID
    namespaces), or the PID-based fallback of this namespace."""
    store.upgrade()
    reaped: tuple[str, ...] = ()
    if backend is not None:
        reaped = tuple(f"{run.name}: {run.action}" for run in backend.reap(owner_alive))
    active = store.list_experiments(status=("running", "evaluating"), limit=100_000)
    dead_owners = sorted({
        record.lease_owner for record in active
        if record.lease_owner and record.lease_owner.rpartition(":")[0] == instance
        and not owner_alive(record.lease_owner)
    })
    interrupted: list[int] = []
    for owner in dead_owners:
        interrupted += store.interrupt_orphans(
            owner, f"daemon {owner} stopped while this experiment ran (found at start-up)")
    requeued = tuple(store.requeue_expired())
    result = Reconciled(reaped, tuple(interrupted), requeued)
    if reaped or interrupted or requeued:
        log.warning("start-up reconciliation", reaped=list(reaped), interrupted=list(interrupted),
                    requeued=list(requeued))
    return result
