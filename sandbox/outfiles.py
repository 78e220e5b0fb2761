"""Read a finished run's out dir safely: regular files only, never through a symlink, size-capped.

The out dir was writable by untrusted code, so every entry is opened with O_NOFOLLOW and checked with
fstat on the opened descriptor (no check-then-open race). Symlinks, FIFOs, sockets, devices and
sub-directories are refused; files over the cap stay on disk unread (the checkpoint is used in place).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

# Files the daemon reads back (train.json, result.json) are tiny; anything bigger is not collected.
MAX_COLLECT_BYTES = 1024 * 1024
MAX_COLLECT_FILES = 64


@dataclass(frozen=True)
class OutFiles:
    """What was collected from an out dir and what was refused (name -> reason)."""

    files: dict[str, bytes] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def describe_refused(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in sorted(self.refused.items()))


def open_regular(path: Path) -> int:
    """Open `path` for reading iff it is a regular file reached without following a symlink; return the fd."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_safe_regular_file(path: Path) -> bool:
    """True iff `path` is a regular file and not a symlink (used before mounting a checkpoint)."""
    try:
        os.close(open_regular(path))
    except OSError:
        return False
    return True


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink refused"
    if stat.S_ISDIR(mode):
        return "directory not collected"
    return "special file refused"


def read_out_files(out_dir: Path, max_bytes: int = MAX_COLLECT_BYTES) -> OutFiles:
    """Collect the top-level regular files of `out_dir` up to `max_bytes` each."""
    files: dict[str, bytes] = {}
    refused: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(out_dir), key=lambda e: e.name)
    except OSError as exc:
        return OutFiles(refused={".": f"out dir unreadable: {exc.strerror}"})
    for entry in entries:
        if len(files) >= MAX_COLLECT_FILES:
            refused[entry.name] = f"more than {MAX_COLLECT_FILES} files"
            continue
        mode = entry.stat(follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            refused[entry.name] = _kind(mode)
            continue
        try:
            fd = open_regular(Path(entry.path))
        except OSError as exc:
            refused[entry.name] = f"cannot open safely: {exc}"
            continue
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                refused[entry.name] = f"{size} bytes, over the {max_bytes}-byte collect cap (left on disk)"
                continue
            files[entry.name] = handle.read(max_bytes)
    return OutFiles(files=files, refused=refused)


def prepare_out_dir(out_dir: Path, uid: int = 1000, gid: int = 1000, shared: bool = False) -> None:
    """Create an empty out dir that the sandbox user (uid 1000) can write; refuse a non-empty one.

    `shared`: a split stage's out dir (RunSpec.split_identities), where the candidate writes through its group
    `gid` and the sticky bit keeps it from removing or renaming what the harness wrote (train.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        from sandbox.errors import InvalidSpec

        raise InvalidSpec(f"out dir {out_dir} is not empty: use a fresh directory per run")
    sticky = 0o1000 if shared else 0
    if os.geteuid() == 0:
        os.chown(out_dir, uid, gid)
    os.chmod(out_dir, (0o770 if os.geteuid() == 0 else 0o777) | sticky)


def out_dir_bytes(out_dir: Path) -> int:
    """Bytes allocated under `out_dir` (never following symlinks; unreadable folders count as empty)."""
    total = 0
    for root, dirs, files in os.walk(out_dir, followlinks=False):
        for name in (*dirs, *files):
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def remove_tree(path: Path) -> bool:
    """Remove `path` whatever permissions the sandbox left inside (folders are made writable and searchable
    first, as far as this user may); True when it is gone."""
    if not os.path.lexists(path):
        return True
    for root, dirs, _files in os.walk(path, followlinks=False):
        for name in dirs:
            full = os.path.join(root, name)
            try:
                if not os.path.islink(full):
                    os.chmod(full, 0o700)
            except OSError:
                continue
    for _ in range(2):  # a second pass for folders that became walkable only after the first chmod
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return True
        for root, dirs, _files in os.walk(path, followlinks=False):
            for name in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, name), 0o700)
    return not os.path.lexists(path)
