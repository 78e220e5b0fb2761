"""Disk housekeeping: `autoresearch prune` and the daemon after each session (`[retention]`).

Old trainer and base images (the newest `keep_images` of each, every image in use and the configured one are
kept), dangling leftovers of our own image builds, old cached wheel sets, and run folders that a crash left
behind past `run_days` (never the folder of a run in progress). Docker is asked only when it answers; any
failure here is logged and reported, never raised into the daemon's loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

from daemon.config import Settings
from daemon.ops.logs import get_logger
from sandbox.prune import PruneReport, prune_images, prune_run_folders, prune_wheels

log = get_logger("autoresearch.housekeeping")


def prune_all(settings: Settings, runs_dir: Path, *, active_runs: Iterable[str] = (), dry_run: bool = False,
              images: bool = True) -> PruneReport:
    """Everything `[retention]` bounds, in one report (Docker's part skipped when no engine answers)."""
    retention = settings.retention
    total = PruneReport()
    parts: list[PruneReport] = []
    if images:  # the images and the wheel sets their builds downloaded
        client = None
        try:
            import docker

            client = docker.from_env(timeout=30)
            client.ping()
        except Exception as exc:  # no engine here: nothing of Docker's to prune
            total.refused.append(f"images: no Docker engine answers ({type(exc).__name__})")
            client = None
        if client is not None:
            try:
                parts.append(prune_images(client, keep=retention.keep_images, protect=[settings.sandbox.image],
                                          dry_run=dry_run))
            finally:
                with contextlib.suppress(Exception):
                    client.close()
        parts.append(prune_wheels(keep=retention.keep_wheel_sets, dry_run=dry_run))
    parts.append(prune_run_folders(runs_dir, older_than_days=retention.run_days, active=active_runs,
                                   dry_run=dry_run))
    for part in parts:
        total.removed += part.removed
        total.kept += part.kept
        total.refused += part.refused
        total.freed_bytes += part.freed_bytes
    return total


def prune_after_session(settings: Settings, runs_dir: Path, *, docker_backend: bool) -> None:
    """The daemon's call when a session has ended: prune, log one line, never raise. Images and wheel sets are
    pruned only when this daemon runs the docker backend (they are its images); run folders always."""
    if not settings.retention.prune_after_session:
        return
    try:
        report = prune_all(settings, runs_dir, images=docker_backend)
    except Exception as exc:
        log.warning("disk housekeeping failed", error=f"{type(exc).__name__}: {exc}")
        return
    log.info("disk housekeeping", removed=len(report.removed), freed_gb=round(report.freed_bytes / 1e9, 2),
             left=report.refused[:5])
