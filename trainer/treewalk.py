"""Iterative, bounded walks over trees that untrusted code made (out dirs, compile caches), and their removal.

Python 3.11's os.walk, Path.rglob and shutil.rmtree recurse: a folder chain a few thousand levels deep raises
RecursionError, and a path past PATH_MAX fails with ENAMETOOLONG (which os.walk skips without a word). Here
every walk is a loop over folder descriptors: a folder is opened by one name relative to its parent's
descriptor (O_DIRECTORY | O_NOFOLLOW), listed with os.scandir on that descriptor, its entries removed with
unlink/rmdir(dir_fd=...). No path longer than one name is formed, no symlink is followed, no FIFO, socket or
device is ever opened, and names are whatever bytes the folder holds (surrogate-escaped, as os.fsdecode).

- `TreeWalk` yields the entries of a tree under `Bounds` (depth, entries, name and path bytes, total bytes)
  and stops at the first bound passed, saying why in one line (`problem`).
- `remove_tree` / `empty_folder` remove everything at any depth, holding two descriptors at a time; folders
  locked by their owner (chmod 000) are unlocked first where this user may. The way back up goes through
  '..' and checks that it is the folder it came from (device and inode): a folder moved meanwhile stops the
  removal (False) instead of taking it anywhere else.

This file exists twice, byte for byte: trainer/treewalk.py (the trainer imports nothing outside trainer/) and
sandbox/treewalk.py (the sandbox imports nothing of the trainer's); a test keeps the two equal. The Docker
purge container runs this same file as its script (`python3 -c SOURCE FOLDER` empties FOLDER).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
REMOVAL_BATCH = 4096  # sub-folder names a removal remembers per folder before it lists that folder again


@dataclass(frozen=True)
class Bounds:
    """How much of a tree a walk takes: entries deeper, more, longer or larger than this stop it."""

    max_depth: int = 32            # the root's own entries are at depth 1
    max_entries: int = 100_000
    max_name_bytes: int = 255
    max_path_bytes: int = 4096     # the entry's path from the root, separators included
    max_bytes: int | None = None   # what the entries take: allocated blocks, or a regular file's length if more


@dataclass(frozen=True)
class Entry:
    """One entry met by a walk; `dir_fd` (its folder) is open only until the walk goes on."""

    folder: tuple[str, ...]
    name: str
    info: os.stat_result
    dir_fd: int

    @property
    def relpath(self) -> str:
        return "/".join((*self.folder, self.name))


@dataclass
class _Frame:
    fd: int
    listing: Iterator[os.DirEntry[str]]
    folder: tuple[str, ...]
    path_bytes: int


def charge(info: os.stat_result) -> int:
    """Bytes an entry counts for: its allocated blocks, or a regular file's length where that is more."""
    used = info.st_blocks * 512
    return max(used, info.st_size) if stat.S_ISREG(info.st_mode) else used


def _unlock(dir_fd: int | None, name: str) -> None:
    """Give its owner rwx on a folder it may not list (chmod through /proc: no link is followed on the way)."""
    handle = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
    try:
        mode = stat.S_IMODE(os.fstat(handle).st_mode)
        os.chmod(f"/proc/self/fd/{handle}", mode | 0o700)
    finally:
        os.close(handle)


def open_folder(dir_fd: int | None, name: str, unlock: bool = False) -> int:
    """A descriptor of the folder `name` in `dir_fd` (a path when dir_fd is None); never through a symlink.
    `unlock`: a folder this user may not list is made listable first, where its mode is this user's to change."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        if not unlock:
            raise
    _unlock(dir_fd, name)
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


class TreeWalk:
    """The entries under `root`, depth first, each lstat'ed once; iterate it once.

    Afterwards `problem` is '' when the whole tree was seen within the bounds, else one line saying which
    bound it passed (the walk stops there); `entries` and `bytes` count what was seen, `unreadable` the
    folders it could not open (their content is not seen). A missing root is an empty tree."""

    def __init__(self, root: str | os.PathLike[str], bounds: Bounds | None = None, *, unlock: bool = False) -> None:
        self.root = os.fspath(root)
        self.bounds = bounds if bounds is not None else Bounds()
        self.unlock = unlock
        self.entries = 0
        self.bytes = 0
        self.depth = 0
        self.unreadable = 0
        self.problem = ""

    def _over(self, name: str, depth: int, path_bytes: int) -> str:
        b = self.bounds
        if self.entries > b.max_entries:
            return f"more than {b.max_entries} entries"
        if depth > b.max_depth:
            return f"folders nested deeper than {b.max_depth} levels"
        if len(os.fsencode(name)) > b.max_name_bytes:
            return f"a name longer than {b.max_name_bytes} bytes"
        if path_bytes > b.max_path_bytes:
            return f"a path longer than {b.max_path_bytes} bytes"
        return ""

    def __iter__(self) -> Iterator[Entry]:
        try:
            fd = open_folder(None, self.root, self.unlock)
        except FileNotFoundError:
            return
        except OSError:
            self.unreadable += 1
            return
        stack = [_Frame(fd, os.scandir(fd), (), 0)]
        try:
            while stack:
                top = stack[-1]
                try:
                    entry = next(top.listing, None)
                except OSError:
                    entry = None
                if entry is None:
                    stack.pop()
                    _close(top)
                    continue
                self.entries += 1
                depth = len(stack)
                path_bytes = top.path_bytes + len(os.fsencode(entry.name)) + (1 if top.folder else 0)
                self.problem = self._over(entry.name, depth, path_bytes)
                if self.problem:
                    return
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
                self.depth = max(self.depth, depth)
                self.bytes += charge(info)
                if self.bounds.max_bytes is not None and self.bytes > self.bounds.max_bytes:
                    self.problem = f"more than {self.bounds.max_bytes} bytes"
                    return
                yield Entry(top.folder, entry.name, info, top.fd)
                if stat.S_ISDIR(info.st_mode):
                    try:
                        child = open_folder(top.fd, entry.name, self.unlock)
                    except OSError:
                        self.unreadable += 1
                        continue
                    try:
                        listing = os.scandir(child)
                    except OSError:
                        os.close(child)
                        self.unreadable += 1
                        continue
                    stack.append(_Frame(child, listing, (*top.folder, entry.name), path_bytes))
        finally:
            for frame in stack:
                _close(frame)


def _close(frame: _Frame) -> None:
    close = getattr(frame.listing, "close", None)
    if close is not None:
        close()
    os.close(frame.fd)


def measure(root: str | os.PathLike[str], bounds: Bounds | None = None, *, unlock: bool = False) -> TreeWalk:
    """Walk `root` to the end (or to the first bound passed) and return the finished walk (bytes, problem...)."""
    walk = TreeWalk(root, bounds, unlock=unlock)
    for _entry in walk:
        pass
    return walk


# ---------------------------------------------------------------------------------------------
# removal

@dataclass
class _Level:
    name: str
    ident: tuple[int, int]
    pending: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)


def _ident(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _clear_entries(fd: int, failed: set[str]) -> list[str]:
    """Unlink every non-folder in the folder `fd`; return up to REMOVAL_BATCH of its sub-folders to go into."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o700 != 0o700:
        with contextlib.suppress(OSError):  # not ours: what it holds may still be removable
            os.fchmod(fd, mode | 0o700)
    folders: list[str] = []
    with os.scandir(fd) as listing:
        for entry in listing:
            name = entry.name
            if name in failed:
                continue
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_folder = False
            if not is_folder:
                try:
                    os.unlink(name, dir_fd=fd)
                    continue
                except FileNotFoundError:
                    continue
                except IsADirectoryError:
                    pass
                except OSError:
                    failed.add(name)
                    continue
            if len(folders) < REMOVAL_BATCH:
                folders.append(name)
    return folders


def _empty(root_fd: int) -> bool:
    """Remove everything under the open folder `root_fd` (which stays); True when nothing is left."""
    levels = [_Level("", _ident(root_fd))]
    fd = os.dup(root_fd)
    try:
        while True:
            level = levels[-1]
            if not level.pending:
                try:
                    level.pending = _clear_entries(fd, level.failed)
                except OSError:
                    level.failed.add("")  # cannot list it: it cannot be emptied
                    level.pending = []
            if level.pending:
                name = level.pending.pop()
                try:
                    child = open_folder(fd, name, unlock=True)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link or a file since it was listed
                        try:
                            os.unlink(name, dir_fd=fd)
                            continue
                        except OSError:
                            pass
                    level.failed.add(name)
                    continue
                levels.append(_Level(name, _ident(child)))
                os.close(fd)
                fd = child
                continue
            if len(levels) == 1:
                return not level.failed
            # Done with this folder: back to its parent through '..', which must be the folder we came from.
            parent = levels[-2]
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            if _ident(up) != parent.ident:
                return False  # the tree was moved while we were in it: stop here
            levels.pop()
            try:
                os.rmdir(level.name, dir_fd=fd)
            except FileNotFoundError:
                pass
            except OSError:
                parent.failed.add(level.name)
    except OSError:
        return False
    finally:
        os.close(fd)



def empty_folder(path: str | os.PathLike[str]) -> bool:
    """Remove everything inside the folder `path` (the folder stays); True when it is empty."""
    try:
        fd = open_folder(None, os.fspath(path), unlock=True)
    except OSError:
        return False
    try:
        return _empty(fd)
    finally:
        os.close(fd)


def remove_tree(path: str | os.PathLike[str]) -> bool:
    """Remove `path` (a link itself, never what it points to; a folder with everything in it, at any depth);
    True when it is gone. Never raises for what the tree holds."""
    parent, name = os.path.split(os.fspath(path).rstrip("/"))
    if not name:
        return False
    try:
        parent_fd = os.open(parent or ".", _DIR_FLAGS)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        try:
            os.unlink(name, dir_fd=parent_fd)
            return True
        except FileNotFoundError:
            return True
        except IsADirectoryError:
            pass
        except OSError:
            if not _is_folder(parent_fd, name):
                return False
        try:
            fd = open_folder(parent_fd, name, unlock=True)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            _empty(fd)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True
    finally:
        os.close(parent_fd)


def _is_folder(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


if __name__ == "__main__":
    # The purge container: `python3 -c "$(cat treewalk.py)" FOLDER...` empties each FOLDER; exit 1 if any is not.
    sys.exit(0 if all([empty_folder(folder) for folder in sys.argv[1:]]) else 1)
