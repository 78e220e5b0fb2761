"""Read a finished run's out dir safely: regular files only, never through a symlink, size-capped.

The out dir was writable by untrusted code, so every entry is opened with O_NOFOLLOW and checked with
fstat on the opened descriptor (no check-then-open race). Symlinks, FIFOs, sockets, devices and
sub-directories are refused; files over the cap stay on disk unread (the checkpoint is used in place).
Only the first MAX_SCAN_ENTRIES names of the folder are looked at. Measuring and removing the whole tree goes
through sandbox.treewalk: iterative, bounded, never through a link, whatever the depth.
"""

from __future__ import annotations

import itertools
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from sandbox import treewalk

# Files the daemon reads back (train.json, result.json) are tiny; anything bigger is not collected.
MAX_COLLECT_BYTES = 1024 * 1024
MAX_COLLECT_FILES = 64
MAX_SCAN_ENTRIES = 4096   # names of the out dir's top level looked at by read_out_files
MAX_REFUSED_NOTES = 16    # refusals named one by one; the rest are counted
# What a run's out dir may hold for the daemon to measure it: an honest one holds a checkpoint, train.json and
# at most a published compile cache (a few levels, a few thousand files). More is a `crashed` run.
OUT_DIR_BOUNDS = treewalk.Bounds(max_depth=32, max_entries=100_000, max_name_bytes=255, max_path_bytes=4096)


@dataclass(frozen=True)
class OutFiles:
    """What was collected from an out dir and what was refused (name -> reason)."""

    files: dict[str, bytes] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def describe_refused(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in sorted(self.refused.items()))


@dataclass(frozen=True)
class TreeSize:
    """What a bounded walk of an out dir saw: bytes (allocated, or a file's length if more) and entries;
    `problem` says which bound it passed ('' when the whole tree was within them)."""

    bytes: int
    entries: int
    problem: str


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
    """Collect the top-level regular files of `out_dir` up to `max_bytes` each (among its first
    MAX_SCAN_ENTRIES names)."""
    files: dict[str, bytes] = {}
    refused: dict[str, str] = {}
    extra_refusals = 0

    def refuse(name: str, why: str) -> None:
        nonlocal extra_refusals
        if len(refused) < MAX_REFUSED_NOTES:
            refused[name] = why
        else:
            extra_refusals += 1

    try:
        with os.scandir(out_dir) as listing:
            names = [entry.name for entry in itertools.islice(listing, MAX_SCAN_ENTRIES + 1)]
    except OSError as exc:
        return OutFiles(refused={".": f"out dir unreadable: {exc.strerror}"})
    if len(names) > MAX_SCAN_ENTRIES:
        refused["..."] = f"more than {MAX_SCAN_ENTRIES} entries: the rest not looked at"
        names = names[:MAX_SCAN_ENTRIES]
    for name in sorted(names):
        try:
            mode = os.lstat(out_dir / name).st_mode
        except OSError:
            continue  # gone meanwhile
        if not stat.S_ISREG(mode):
            refuse(name, _kind(mode))
            continue
        if len(files) >= MAX_COLLECT_FILES:
            refuse(name, f"more than {MAX_COLLECT_FILES} files")
            continue
        try:
            fd = open_regular(out_dir / name)
        except OSError as exc:
            refuse(name, f"cannot open safely: {exc.strerror or exc}")
            continue
        with os.fdopen(fd, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                refuse(name, f"{size} bytes, over the {max_bytes}-byte collect cap (left on disk)")
                continue
            files[name] = handle.read(max_bytes)
    if extra_refusals:
        refused["(others)"] = f"{extra_refusals} more entries refused"
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


def out_dir_size(out_dir: Path, bounds: treewalk.Bounds = OUT_DIR_BOUNDS) -> TreeSize:
    """The size of everything under `out_dir`, never following a link, walked within `bounds` (an out dir
    over them says so in `problem`); folders this user cannot open count as empty."""
    walk = treewalk.measure(out_dir, bounds)
    problem = f"out dir holds {walk.problem}" if walk.problem else ""
    return TreeSize(bytes=walk.bytes, entries=walk.entries, problem=problem)


def remove_tree(path: Path) -> bool:
    """Remove `path` whatever depth, shape and permissions the sandbox left inside (folders are made
    listable and writable first, as far as this user may); True when it is gone."""
    return treewalk.remove_tree(path)
