"""Class 5: out-dir shapes that killed the daemon. Hostile trees (deep, wide, long names, link loops, FIFOs,
sockets, devices, locked folders, names that are not UTF-8, and all of them nested in one another) go through
the real code that reads, measures and removes what a candidate left: no exception, a bounded answer,
nothing left on disk."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import treewalk
from sandbox.outfiles import MAX_REFUSED_NOTES, OUT_DIR_BOUNDS, out_dir_size, read_out_files, remove_tree
from tests.redteam import hostile_trees

REPO_ROOT = Path(__file__).resolve().parents[2]
# Shapes an honest run never makes but that are within the bounds: measured in full, no problem.
WITHIN_BOUNDS = ("links", "specials", "odd_names", "locked")
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by any uid (the suite's venv may not be)


@pytest.fixture()
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A folder for hostile trees: on tmpfs where there is one (thousands of rmdir calls on a loaded disk take
    seconds each test; the walk is the same on any filesystem), removed afterwards whatever happened."""
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="treewalk-test-", dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) \
        else tmp_path / "scratch"
    base.mkdir(exist_ok=True)
    yield base
    treewalk.remove_tree(base)


def _victim(tmp_path: Path) -> Path:
    """A folder outside the run that links point at: it must survive every removal untouched."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    return victim


def _intact(victim: Path) -> bool:
    return (victim / "precious").read_text() == "keep me"


def _out_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run" / "train_out"
    out.mkdir(parents=True)
    (out / "train.json").write_text('{"exit_code": 0}')
    return out


def test_the_two_copies_of_treewalk_are_one_file() -> None:
    """trainer/treewalk.py and sandbox/treewalk.py are the same bytes (the layering forbids one importing the other)."""
    assert (REPO_ROOT / "trainer" / "treewalk.py").read_bytes() == (REPO_ROOT / "sandbox" / "treewalk.py").read_bytes()


@pytest.mark.parametrize("shape", [*hostile_trees.SHAPES, "mixed-0", "mixed-1", "mixed-2"])
def test_hostile_out_dir_is_read_measured_and_removed(scratch: Path, shape: str) -> None:
    """Reading the out files, measuring the out dir and removing the run folder neither raise nor leave anything;
    a tree past the bounds says which one, a tree within them is measured whole."""
    victim = _victim(scratch)
    out = _out_dir(scratch)
    if shape.startswith("mixed"):
        hostile_trees.mixed(str(out), int(shape.split("-")[1]), outside=str(victim))
    else:
        hostile_trees.lock(hostile_trees.build(str(out), shape, outside=str(victim)))
    files = read_out_files(out)
    assert files.files["train.json"] == b'{"exit_code": 0}' and "model.pt2" not in files.files
    size = out_dir_size(out)
    if shape in WITHIN_BOUNDS:
        assert size.problem == "" and size.entries > 2
    else:
        assert size.problem.startswith("out dir holds ") and "\n" not in size.problem
    assert remove_tree(scratch / "run") and not (scratch / "run").exists()
    assert _intact(victim)


def test_wide_out_dir_is_bounded_and_removed(scratch: Path) -> None:
    """More entries than the walk takes: the size says so, reading looks at a bounded part, removal takes all."""
    out = _out_dir(scratch)
    hostile_trees.wide(str(out), OUT_DIR_BOUNDS.max_entries + 1)
    files = read_out_files(out)
    assert len(files.refused) <= MAX_REFUSED_NOTES + 2 and len(files.describe_refused()) < 4000
    assert out_dir_size(out).problem == f"out dir holds more than {OUT_DIR_BOUNDS.max_entries} entries"
    assert remove_tree(scratch / "run") and not (scratch / "run").exists()


@pytest.mark.parametrize(("bounds", "problem"), [
    (treewalk.Bounds(max_depth=3), "folders nested deeper than 3 levels"),
    (treewalk.Bounds(max_entries=3), "more than 3 entries"),
    (treewalk.Bounds(max_name_bytes=10), "a name longer than 10 bytes"),
    (treewalk.Bounds(max_path_bytes=19), "a path longer than 19 bytes"),
    (treewalk.Bounds(max_bytes=10_000), "more than 10000 bytes"),
])
def test_each_bound_stops_the_walk_and_names_itself(tmp_path: Path, bounds: treewalk.Bounds, problem: str) -> None:
    """Each bound, passed by one, stops the walk with its own one-line reason; one less is within it."""
    folder = tmp_path / "a" / "bb" / "ccc"
    folder.mkdir(parents=True)
    (folder / "name-of-11b").write_bytes(b"z" * 20_000)
    walk = treewalk.measure(tmp_path, bounds)
    assert walk.problem == problem
    roomy = treewalk.Bounds(max_depth=4, max_entries=4, max_name_bytes=11, max_path_bytes=20, max_bytes=10**6)
    assert treewalk.measure(tmp_path, roomy).problem == ""


def test_removal_works_for_an_unprivileged_owner(scratch: Path) -> None:
    """As a plain user (no root to bypass modes), a deep tree with locked folders it owns is still removed whole."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start the unprivileged child as another uid")
    scratch.chmod(0o777)
    script = scratch / "run.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path[:0] = [{str(REPO_ROOT / 'sandbox')!r}, {str(REPO_ROOT / 'tests' / 'redteam')!r}]\n"
        "import hostile_trees, treewalk\n"
        "root = sys.argv[1] + '/run'\n"
        "os.mkdir(root)\n"
        "hostile_trees.mixed(root, 3)\n"
        "hostile_trees.deep_chain(root)\n"
        "os.chmod(root, 0)\n"
        "print(treewalk.remove_tree(root), os.path.lexists(root))\n")
    done = subprocess.run([SYSTEM_PYTHON, "-S", str(script), str(scratch)], user=65534, group=65534,
                          extra_groups=[], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "False"]


def test_a_link_swapped_in_for_a_folder_is_removed_not_followed(scratch: Path) -> None:
    """A folder that became a symlink (to a folder outside) is removed as a link; the outside stays whole."""
    victim = _victim(scratch)
    run = scratch / "run"
    (run / "a").mkdir(parents=True)
    (run / "a").rmdir()
    (run / "a").symlink_to(victim, target_is_directory=True)
    assert remove_tree(run) and not run.exists() and _intact(victim)
    assert treewalk.remove_tree(victim / "precious") and not (victim / "precious").exists()


def test_removal_stops_when_a_folder_is_moved_out_from_under_it(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder moved elsewhere mid-removal (a racing process) stops the removal on its way back up: the place
    it was moved to is never emptied."""
    victim = _victim(scratch)
    (scratch / "run" / "a" / "b" / "c").mkdir(parents=True)
    deepest = os.stat(scratch / "run" / "a" / "b" / "c").st_ino
    clear = treewalk._clear_entries

    def racing_clear(fd: int, failed: set[str]) -> list[str]:
        if os.fstat(fd).st_ino == deepest and (scratch / "run" / "a" / "b").exists():
            os.rename(scratch / "run" / "a" / "b", victim / "b")  # what an attacker's process would do
        return clear(fd, failed)

    monkeypatch.setattr(treewalk, "_clear_entries", racing_clear)
    assert not treewalk.remove_tree(scratch / "run")
    assert _intact(victim)
