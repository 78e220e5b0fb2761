"""What the bounded, descriptor-based walks (sandbox/treewalk.py) cost against the recursive ones they replaced,
on a normal out dir, side by side (median wall milliseconds).

    .venv/bin/python bench/treewalk_bench.py [--repeats 15] [--cache-files 2000] [--dir /dev/shm]

The out dir is what an honest publishing run leaves: a checkpoint, train.json, and a compile cache laid out as
Inductor and Triton lay theirs (two-character shards, hashed names, a few levels). Measured: reading the out
files, measuring the out dir, removing it. The "old" column runs the code as it was before (os.walk + lstat,
os.walk chmod pass + shutil.rmtree), copied here. Also shown: a 5000-level chain, which the old code cannot walk.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import stat
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from sandbox import treewalk  # noqa: E402
from sandbox.outfiles import out_dir_size, read_out_files  # noqa: E402


def old_read_out_files(out_dir: Path, max_bytes: int = 1 << 20) -> dict[str, bytes]:
    """sandbox.outfiles.read_out_files before this change (every name sorted, no scan bound)."""
    files: dict[str, bytes] = {}
    for entry in sorted(os.scandir(out_dir), key=lambda e: e.name):
        if len(files) >= 64 or not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
            continue
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            if os.fstat(handle.fileno()).st_size <= max_bytes:
                files[entry.name] = handle.read(max_bytes)
    return files


def old_out_dir_bytes(out_dir: Path) -> int:
    """sandbox.outfiles.out_dir_bytes before this change."""
    total = 0
    for root, dirs, files in os.walk(out_dir, followlinks=False):
        for name in (*dirs, *files):
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def old_remove_tree(path: Path) -> bool:
    """sandbox.outfiles.remove_tree before this change."""
    if not os.path.lexists(path):
        return True
    for root, dirs, _files in os.walk(path, followlinks=False):
        for name in dirs:
            full = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if not os.path.islink(full):
                    os.chmod(full, 0o700)
    for _ in range(2):
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return True
    return not os.path.lexists(path)


def normal_out_dir(root: Path, cache_files: int) -> Path:
    out = root / "train_out"
    out.mkdir()
    (out / "model.pt2").write_bytes(os.urandom(4 << 20))
    (out / "train.json").write_text('{"exit_code": 0}\n')
    cache = out / "compile-cache"
    for i in range(cache_files):
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        if i % 2:
            folder = cache / "inductor" / "fxgraph" / digest[:2] / f"f{digest[2:50]}"
            name = f"{digest[50:]}.py"
        else:
            folder = cache / "triton" / digest[:52]
            name = "kernel.cubin"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"#" * 2048)
    return out


def median_ms(action: Callable[[], object], setup: Callable[[], None] | None, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cache-files", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="where to build the trees (default: the temp folder)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="treewalk-bench-", dir=args.dir))
    try:
        template = base / "template"
        template.mkdir()
        out = normal_out_dir(template, args.cache_files)
        entries = treewalk.measure(out).entries
        work = base / "work"

        def fresh() -> None:
            treewalk.remove_tree(work)
            shutil.copytree(template, work)

        print(f"normal out dir: {entries} entries, {args.cache_files} cache files; median of {args.repeats} "
              f"(ms), under {base.parent}")
        print(f"{'':24}{'old':>10}{'new':>10}")
        rows = [
            ("read out files", lambda: old_read_out_files(out), lambda: read_out_files(out)),
            ("measure out dir", lambda: old_out_dir_bytes(out), lambda: out_dir_size(out)),
        ]
        for label, old, new in rows:
            old_ms = median_ms(old, None, args.repeats)
            print(f"{label:24}{old_ms:10.2f}{median_ms(new, None, args.repeats):10.2f}")
        # Interleaved, one of each per round: on a shared disk the load drifts between blocks of runs.
        removals: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeats):
            for key, remove in (("old", old_remove_tree), ("new", treewalk.remove_tree)):
                removals[key].append(median_ms(lambda remove=remove: remove(work / "train_out"), fresh, 1))
        print(f"{'remove out dir':24}{statistics.median(removals['old']):10.2f}"
              f"{statistics.median(removals['new']):10.2f}")
        treewalk.remove_tree(work)
        chain = base / "chain"
        chain.mkdir()
        fd = os.open(chain, os.O_RDONLY)
        for _ in range(5000):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(fd)
        try:
            old_remove_tree(chain)
            old = "removed"
        except RecursionError:
            old = "RecursionError"
        started = time.perf_counter()
        gone = treewalk.remove_tree(chain)
        print(f"{'5000-level chain':24}{old:>16}  new: {'removed' if gone else 'LEFT'} in "
              f"{(time.perf_counter() - started) * 1000:.0f} ms")
    finally:
        treewalk.remove_tree(base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
