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

The copy takes only regular files and folders (no symlinks, nothing special), bounded in size.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

CACHE_ENV = "AUTORESEARCH_COMPILE_CACHE"             # the shared cache folder (read-only for candidates)
PUBLISH_ENV = "AUTORESEARCH_COMPILE_CACHE_PUBLISH"   # "1": the warm-up run that may fill the shared cache
MAX_CACHE_BYTES = 4 << 30                            # a larger shared cache is not copied (compiles cold)
PUBLISHED_DIR = "compile-cache"                       # in the out dir of a publishing run
CACHE_SUBDIRS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                info = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def copy_regular_tree(source: Path, target: Path, *, skip_existing: bool = False) -> int:
    """Copy regular files and folders of `source` into `target` (symlinks and special files skipped);
    returns the number of files copied."""
    copied = 0
    for folder, dirs, files in os.walk(source):
        rel = Path(folder).relative_to(source)
        dest = target / rel
        dest.mkdir(parents=True, exist_ok=True)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
        for name in files:
            src = Path(folder) / name
            if not stat.S_ISREG(os.lstat(src).st_mode):
                continue
            if skip_existing and (dest / name).exists():
                continue
            tmp = dest / f".{name}.part"
            shutil.copyfile(src, tmp, follow_symlinks=False)
            tmp.replace(dest / name)
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
    """Let a candidate running under another uid (trainer.privsep) compile into the private folder."""
    for root, dirs, files in os.walk(private):
        os.chmod(root, 0o777)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777)


def publish(private: Path, target: Path) -> str:
    """After a clean warm-up run: copy its cache entries to `target` (the run's out dir), from where the runner
    (on the host, trusted) adds them to the lane's shared cache. Returns a note for the log."""
    if _tree_bytes(private) > MAX_CACHE_BYTES:
        return "compile cache: nothing published (over the size cap)"
    files = copy_regular_tree(private, target)
    return f"compile cache: {files} files left in {target.name}/ for the shared cache"


def harvest(published: Path, shared: Path) -> int:
    """Host side, for a publishing run only: add the entries of its `published` folder to `shared` (existing
    entries are never overwritten). Returns the number of files added."""
    if not published.is_dir() or published.is_symlink():
        return 0
    shared.mkdir(parents=True, exist_ok=True)
    return copy_regular_tree(published, shared, skip_existing=True)
