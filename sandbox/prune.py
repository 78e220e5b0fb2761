"""Bounded disk: old trainer images, their base images, dangling build leftovers, cached wheels, leftover run
folders.

Each trainer image is ~1.5 GB (CPU) or ~5.5 GB (CUDA) and a new one is built whenever its inputs change;
the wheel cache of a CUDA build is ~2.8 GB. `prune()` keeps the newest `keep` images of each repository (by
creation time) and every image that is in use — by any container, running or stopped, or named by a tag the
caller protects (the configured image) — and removes the rest without force, so Docker itself refuses to
remove anything still referenced. Only what this program made is touched: images of our repositories, and
dangling images whose layers start with one of our debootstrap base images (a build that failed or was
interrupted leaves those; no one else builds on that base). Never another user's image, never by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.images import BASE_REPO, TRAINER_REPO, cache_dir
from sandbox.treewalk import remove_tree

Progress = Callable[[str], None]


@dataclass
class PruneReport:
    """What was (or, in a dry run, would be) removed, and what was kept and why."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    refused: list[str] = field(default_factory=list)  # Docker said no (in use): left alone

    def lines(self) -> list[str]:
        verb = "removed"
        out = [f"{verb} {item}" for item in self.removed]
        out += [f"kept {item}" for item in self.kept]
        out += [f"left {item}" for item in self.refused]
        out.append(f"freed {self.freed_bytes / 1e9:.2f} GB")
        return out


def _created(image: Any) -> str:
    return str(image.attrs.get("Created", ""))


def _layers(image: Any) -> tuple[str, ...]:
    return tuple((image.attrs.get("RootFS") or {}).get("Layers") or ())


def _age_s(image: Any) -> float:
    """Seconds since the image was created (0 when Docker's timestamp cannot be read)."""
    from datetime import datetime, timezone

    raw = _created(image)
    try:  # Docker gives nanoseconds: keep microseconds for fromisoformat
        head, _, rest = raw.partition(".")
        created = datetime.fromisoformat(f"{head}.{rest.rstrip('Z')[:6] or '0'}+00:00" if rest else
                                         raw.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (datetime.now(timezone.utc) - created).total_seconds()


def _in_use(client: Any, protect: Iterable[str]) -> set[str]:
    """Image ids referenced by any container (running or not) or by a protected tag."""
    ids = {container.attrs.get("Image", "") for container in client.containers.list(all=True)}
    for tag in protect:
        with contextlib.suppress(Exception):  # a protected tag that does not exist protects nothing
            ids.add(client.images.get(tag).id)
    return ids


def _remove(client: Any, image: Any, report: PruneReport, dry_run: bool, name: str) -> None:
    size = int(image.attrs.get("Size", 0))
    if dry_run:
        report.removed.append(f"{name} ({size / 1e9:.2f} GB, dry run)")
        report.freed_bytes += size
        return
    import docker

    try:
        # Each tag first (no force: Docker keeps an image that a container uses), then the image itself.
        for tag in image.tags:
            client.images.remove(tag, noprune=False)
        if not image.tags:
            client.images.remove(image.id, noprune=False)
    except docker.errors.APIError as exc:
        report.refused.append(f"{name}: {getattr(exc, 'explanation', exc)}")
        return
    report.removed.append(f"{name} ({size / 1e9:.2f} GB)")
    report.freed_bytes += size


def prune_images(client: Any, *, keep: int, protect: Iterable[str] = (), dry_run: bool = False,
                 trainer_repo: str = TRAINER_REPO, base_repo: str = BASE_REPO,
                 dangling_min_age_s: float = 60.0) -> PruneReport:
    """Keep the newest `keep` images of each of our repositories plus every image in use; remove the rest,
    and the dangling leftovers of our builds (dangling images on one of our base images' layers, older than
    `dangling_min_age_s`, so that a build in progress elsewhere keeps its latest step)."""
    if keep < 1:
        raise ValueError("keep must be at least 1 (the image in use is always kept as well)")
    report = PruneReport()
    in_use = _in_use(client, protect)
    kept_layers: list[tuple[str, ...]] = []
    for repo in (trainer_repo, base_repo):  # trainers first: a base under a kept trainer stays
        images = sorted(client.images.list(name=repo), key=_created, reverse=True)
        for rank, image in enumerate(images):
            name = ", ".join(image.tags) or image.short_id
            layers = _layers(image)
            under_kept = repo == base_repo and any(kept[:len(layers)] == layers for kept in kept_layers)
            if rank < keep or image.id in in_use or under_kept:
                report.kept.append(name)
                kept_layers.append(layers)
                continue
            _remove(client, image, report, dry_run, name)
    bases = [_layers(image) for image in client.images.list(name=base_repo)]
    for image in client.images.list(filters={"dangling": True}):
        layers = _layers(image)
        ours = any(base and layers[:len(base)] == base for base in bases)
        if ours and image.id not in in_use and _age_s(image) >= dangling_min_age_s:
            _remove(client, image, report, dry_run, f"dangling {image.short_id}")
    return report


def _age_days(path: Path, now: float) -> float:
    try:
        return (now - path.lstat().st_mtime) / 86400
    except OSError:
        return 0.0


def _folder_bytes(path: Path, max_entries: int = 1_000_000) -> int:
    """Bytes under `path`, walked iteratively (run folders are candidate-made: any depth), links not followed;
    stops counting after `max_entries` entries."""
    total, stack, seen = 0, [str(path)], 0
    while stack and seen < max_entries:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
            for entry in entries:
                seen += 1
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_size
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
    return total


def prune_wheels(*, keep: int, dry_run: bool = False, root: Path | None = None) -> PruneReport:
    """Keep the newest `keep` wheel folders of the image cache (one per build plan); remove the others."""
    report = PruneReport()
    wheels = (root or cache_dir()) / "wheels"
    folders = sorted((p for p in wheels.iterdir() if p.is_dir() and not p.is_symlink()),
                     key=lambda p: p.stat().st_mtime, reverse=True) if wheels.is_dir() else []
    for rank, folder in enumerate(folders):
        if rank < keep:
            report.kept.append(str(folder))
            continue
        size = _folder_bytes(folder)
        if not dry_run:
            shutil.rmtree(folder, ignore_errors=True)
        report.removed.append(f"{folder} ({size / 1e9:.2f} GB{', dry run' if dry_run else ''})")
        report.freed_bytes += size
    return report


def prune_run_folders(runs_dir: Path, *, older_than_days: float, active: Iterable[str] = (),
                      dry_run: bool = False, remove: Callable[[Path], bool] | None = None,
                      now: float | None = None) -> PruneReport:
    """Remove run folders older than the retention that no active run uses (a run folder is normally
    removed when its run ends: these are what a crash left behind)."""
    report = PruneReport()
    moment = time.time() if now is None else now
    busy = set(active)
    for folder in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if folder.name in busy or _age_days(folder, moment) < older_than_days:
            continue
        size = _folder_bytes(folder) if not folder.is_symlink() else 0
        if not dry_run:
            if folder.is_symlink() or not folder.is_dir():
                folder.unlink(missing_ok=True)
            else:
                (remove or remove_tree)(folder)  # candidate-made: the bounded, link-safe remover
        report.removed.append(f"{folder} ({size / 1e6:.1f} MB{', dry run' if dry_run else ''})")
        report.freed_bytes += size
    return report
