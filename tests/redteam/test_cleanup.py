"""Class 9 clean-up: a run folder goes away whatever permissions the sandbox left in it."""

from __future__ import annotations

from pathlib import Path

from sandbox.outfiles import out_dir_size, remove_tree


def _locked_tree(root: Path) -> Path:
    inner = root / "run" / "train_out" / "a" / "b"
    inner.mkdir(parents=True)
    (inner / "file").write_bytes(b"x" * 5000)
    inner.chmod(0)
    inner.parent.chmod(0)
    return root / "run"


def test_remove_tree_removes_locked_folders(tmp_path: Path) -> None:
    """Folders chmod 000 (and the files in them) are removed."""
    run = _locked_tree(tmp_path)
    assert remove_tree(run) and not run.exists()


def test_remove_tree_of_nothing_is_done(tmp_path: Path) -> None:
    """A folder that does not exist counts as removed."""
    assert remove_tree(tmp_path / "absent")


def test_out_dir_bytes_counts_allocated_bytes(tmp_path: Path) -> None:
    """The out dir's size is what its files allocate, symlinks not followed."""
    (tmp_path / "a").write_bytes(b"x" * 10_000)
    (tmp_path / "link").symlink_to("/usr")
    size = out_dir_size(tmp_path)
    assert 10_000 <= size.bytes < 100_000 and size.entries == 2 and size.problem == ""
