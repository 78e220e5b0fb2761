"""Builders of hostile folder trees, the shapes a candidate can leave in its out dir, TMPDIR or compile cache.

Self-contained (standard library only, nothing a candidate's validation refuses): the tests call the builders
directly, and `candidate_source` turns this very file into a train.py that builds the trees inside a sandbox.
Every builder works through folder descriptors, so it can build what path-based code cannot walk (paths past
PATH_MAX). Folders are locked (chmod 000) last, after everything inside them exists.
"""

from __future__ import annotations

import contextlib
import os
import random
import stat

DEEP_LEVELS = 5000     # Python 3.11's recursion limit is 1000: os.walk/rmtree die long before this
LONG_NAME = 255        # NAME_MAX: 20 such levels make a path past PATH_MAX (4096)


def _descend(fd: int, name: str | bytes) -> int:
    os.mkdir(name, dir_fd=fd)
    child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    return child


def deep_chain(root: str, levels: int = DEEP_LEVELS) -> None:
    """A chain of `levels` nested folders, a file at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(levels):
        fd = _descend(fd, "d")
    os.close(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)


def long_names(root: str, levels: int = 40) -> None:
    """Folders named with NAME_MAX bytes, nested past PATH_MAX, a file in each."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for level in range(levels):
        fd = _descend(fd, f"{level:03d}".ljust(LONG_NAME, "L"))
        os.close(os.open("f" * LONG_NAME, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)


def wide(root: str, count: int) -> None:
    """`count` empty files in one folder."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(count):
        os.close(os.open(f"w{i:07d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)


def links(root: str, outside: str = "/") -> None:
    """Symlink loops (a pair, a self loop, a folder linking to itself and to its parent) and links out."""
    os.symlink("loop_b", os.path.join(root, "loop_a"))
    os.symlink("loop_a", os.path.join(root, "loop_b"))
    os.symlink("self", os.path.join(root, "self"))
    os.mkdir(os.path.join(root, "cycle"))
    os.symlink(".", os.path.join(root, "cycle", "here"))
    os.symlink("..", os.path.join(root, "cycle", "up"))
    os.symlink(outside, os.path.join(root, "outside"))
    os.symlink("/etc/passwd", os.path.join(root, "train.json.link"))


def specials(root: str) -> None:
    """A FIFO, a socket inode, and a device file where this user may make one."""
    os.mkfifo(os.path.join(root, "fifo"))
    os.mknod(os.path.join(root, "socket"), stat.S_IFSOCK | 0o600)
    with contextlib.suppress(OSError):  # CAP_MKNOD: root on a host, never in the sandbox
        os.mknod(os.path.join(root, "null_device"), stat.S_IFCHR | 0o600, os.makedev(1, 3))


def odd_names(root: str) -> None:
    """Names that are not UTF-8, hold control bytes, newlines, escapes, or look like options."""
    base = os.fsencode(root)
    for name in (b"\xff\xfe\xfd", b"bad\x80name", b"line\nbreak", b"\x1b[31mred\x1b[0m", b"-rf", b"\xc3(", b" "):
        os.close(os.open(base + b"/" + name, os.O_WRONLY | os.O_CREAT, 0o644))
    os.mkdir(base + b"/\xff-folder")
    os.close(os.open(base + b"/\xff-folder/\xfe", os.O_WRONLY | os.O_CREAT, 0o644))


def locked(root: str) -> list[str]:
    """Folders with content that their owner cannot list or change (000, 0500); returns them, to lock last."""
    outer = os.path.join(root, "locked")
    inner = os.path.join(outer, "inner")
    os.makedirs(inner)
    with open(os.path.join(inner, "data"), "wb") as handle:
        handle.write(b"x" * 4096)
    readonly = os.path.join(root, "readonly")
    os.mkdir(readonly)
    with open(os.path.join(readonly, "kept"), "wb") as handle:
        handle.write(b"y")
    return [inner, outer, readonly]


def lock(folders: list[str]) -> None:
    for folder in folders:
        os.chmod(folder, 0o500 if folder.endswith("readonly") else 0)


SHAPES = ("deep", "long_names", "links", "specials", "odd_names", "locked")


def build(root: str, shape: str, outside: str = "/") -> list[str]:
    """Build one named shape under `root`; returns the folders still to lock."""
    if shape == "deep":
        deep_chain(root)
    elif shape == "long_names":
        long_names(root)
    elif shape == "links":
        links(root, outside)
    elif shape == "specials":
        specials(root)
    elif shape == "odd_names":
        odd_names(root)
    elif shape == "locked":
        return locked(root)
    return []


def mixed(root: str, seed: int, outside: str = "/") -> None:
    """Every shape at once, each inside another at random (a deep chain under a locked folder under long names...)."""
    rng = random.Random(seed)
    places = [root]
    to_lock: list[str] = []
    for shape in rng.sample(SHAPES, len(SHAPES)):
        host = os.path.join(rng.choice(places), f"{shape}-{rng.randrange(1000)}")
        os.mkdir(host)
        to_lock += build(host, shape, outside)
        places.append(host)
        if shape == "long_names":
            places.append(os.path.join(host, "000".ljust(LONG_NAME, "L")))
    lock(sorted(to_lock, key=len, reverse=True))


def candidate_source(out_shapes: str, tmp_shapes: str = "deep", cache_shapes: str = "deep",
                     squat_report: bool = False) -> str:
    """A train.py (passes the daemon's validation) that builds the given shapes (comma-separated, or `mixed`)
    in its out dir, TMPDIR and compile-cache folder, leaves a regular model.pt2, and exits 0. `squat_report`:
    it also makes train.json (the harness's report) a folder holding a deep chain."""
    with open(__file__, encoding="utf-8") as handle:
        source = handle.read()
    return source + f'''

def _plant(root, shapes):
    os.makedirs(root, exist_ok=True)
    folder = os.path.join(root, "planted")
    os.mkdir(folder)
    if shapes == "mixed":
        mixed(folder, 0)
        return
    to_lock = []
    for shape in filter(None, shapes.split(",")):
        host = os.path.join(folder, shape)
        os.mkdir(host)
        to_lock += build(host, shape)
    lock(to_lock)


if __name__ == "__main__":
    budget = os.environ.get("AUTORESEARCH_TIME_BUDGET")
    out = os.environ["AUTORESEARCH_OUT_DIR"]
    _plant(out, {out_shapes!r})
    _plant(os.environ.get("TMPDIR") or "/tmp", {tmp_shapes!r})
    _plant(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "/tmp/inductor", {cache_shapes!r})
    if {squat_report!r}:
        os.mkdir(os.path.join(out, "train.json"))
        deep_chain(os.path.join(out, "train.json"))
    with open(os.path.join(out, "model.pt2"), "wb") as checkpoint:
        checkpoint.write(b"not a model")
    if budget is None:
        export_checkpoint()  # never reached: the daemon's validation wants the call in the source
'''
