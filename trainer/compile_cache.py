"""Compile reuse across runs without letting one candidate influence another (trusted; used by the harness).

torch.compile keeps what it compiled (Inductor FX graphs and kernels, Triton binaries) in cache folders,
and a warm cache turns tens of seconds of GPU warm-up into a few. Cache entries are code (Python source,
shared libraries, pickles), so a cache a candidate could write would let it run code in, or change the
results of, every later run. The rule:

- every run compiles into a PRIVATE folder in its own tmpfs, seeded with a copy of the lane's shared cache,
  which is mounted read-only: nothing a run writes there outlives it;
- only the daemon-owned warm-up run (the baseline), which the runner marks with
  AUTORESEARCH_COMPILE_CACHE_PUBLISH=1, hands its entries back: the harness copies them into the run's out
  dir (PUBLISHED_DIR) and the runner, on the host, adds them to the shared cache (never overwriting).

The copy takes only regular files and folders (no symlinks, nothing special), bounded in size, depth and
entries (trainer.treewalk: iterative, through folder descriptors, so no shape of tree can crash the harness).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from trainer import treewalk

CACHE_ENV = "AUTORESEARCH_COMPILE_CACHE"             # the shared cache folder (read-only for candidates)
PUBLISH_ENV = "AUTORESEARCH_COMPILE_CACHE_PUBLISH"   # "1": the warm-up run that may fill the shared cache
MAX_CACHE_BYTES = 4 << 30                            # a larger shared cache is not copied (compiles cold)
PUBLISHED_DIR = "compile-cache"                       # in the out dir of a publishing run
CACHE_SUBDIRS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}
# Inductor and Triton caches are a few levels deep with hashed names; anything past these bounds is not a cache.
CACHE_BOUNDS = treewalk.Bounds(max_depth=16, max_entries=100_000, max_name_bytes=255, max_path_bytes=1024)


def _tree_bytes(root: Path) -> int:
    """The bytes of the regular files under `root`; a tree over CACHE_BOUNDS counts as over any cap."""
    total = 0
    walk = treewalk.TreeWalk(root, CACHE_BOUNDS)
    for entry in walk:
        if stat.S_ISREG(entry.info.st_mode):
            total += entry.info.st_size
    return MAX_CACHE_BYTES + 1 + total if walk.problem else total


def _copy_file(entry: treewalk.Entry, dest: Path) -> None:
    fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=entry.dir_fd)
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            return
        tmp = dest.with_name(f".{dest.name}.part")
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        tmp.replace(dest)


def copy_regular_tree(source: Path, target: Path, *, skip_existing: bool = False) -> int:
    """Copy regular files and folders of `source` into `target` (symlinks and special files skipped; the walk
    stops at CACHE_BOUNDS, a file that cannot be copied is left out); returns the number of files copied."""
    copied = 0
    target.mkdir(parents=True, exist_ok=True)
    for entry in treewalk.TreeWalk(source, CACHE_BOUNDS):
        dest = target.joinpath(*entry.folder, entry.name)
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(entry.info.st_mode):
                dest.mkdir(exist_ok=True)
            elif stat.S_ISREG(entry.info.st_mode) and not (skip_existing and os.path.lexists(dest)):
                _copy_file(entry, dest)
                copied += 1
    return copied


def private_cache(shared: str | None) -> tuple[Path, dict[str, str], str]:
    """A fresh private cache folder (seeded from `shared` when that is a folder within the size cap), the
    environment that points torch at it, and a one-line note for the log."""
    private = Path(tempfile.mkdtemp(prefix="compile-cache-"))
    env = {key: str(private / sub) for key, sub in CACHE_SUBDIRS.items()}
    note = "compile cache: cold (no shared cache)"
    if shared and Path(shared).is_dir():
        size = _tree_bytes(Path(shared))
        if size > MAX_CACHE_BYTES:
            note = f"compile cache: cold (the shared cache holds {size / 2**20:.0f} MiB, over the cap)"
        else:
            files = copy_regular_tree(Path(shared), private)
            note = (f"compile cache: warm ({files} files, {size / 2**20:.1f} MiB copied into a private folder)"
                    if files else "compile cache: cold (the shared cache is empty)")
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    return private, env, note


def open_to_all(private: Path) -> None:
    """Let a candidate running under another uid (trainer.privsep) compile into the private folder (the
    harness's own copy, before any candidate code runs: no link in it)."""
    os.chmod(private, 0o777)
    for entry in treewalk.TreeWalk(private, CACHE_BOUNDS):
        if stat.S_ISDIR(entry.info.st_mode) or stat.S_ISREG(entry.info.st_mode):
            with contextlib.suppress(OSError):
                os.chmod(entry.name, 0o777 if stat.S_ISDIR(entry.info.st_mode) else 0o666, dir_fd=entry.dir_fd)


def publish(private: Path, target: Path) -> str:
    """After a clean warm-up run: copy its cache entries to `target` (the run's out dir), from where the runner
    (on the host, trusted) adds them to the lane's shared cache. Returns a note for the log."""
    if _tree_bytes(private) > MAX_CACHE_BYTES:
        return "compile cache: nothing published (over the size cap)"
    try:
        files = copy_regular_tree(private, target)
    except OSError as exc:
        return f"compile cache: nothing published ({exc.strerror or exc})"
    return f"compile cache: {files} files left in {target.name}/ for the shared cache"


def harvest(published: Path, shared: Path) -> int:
    """Host side, for a publishing run only: add the entries of its `published` folder to `shared` (existing
    entries are never overwritten). Returns the number of files added."""
    if not published.is_dir() or published.is_symlink():
        return 0
    shared.mkdir(parents=True, exist_ok=True)
    return copy_regular_tree(published, shared, skip_existing=True)
