"""trainer.compile_cache: every run compiles into a private copy; only a publishing run fills the shared cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from trainer import compile_cache


@pytest.fixture()
def shared(tmp_path: Path) -> Path:
    """A shared cache with one Inductor entry, one Triton entry and a symlink that must never be followed."""
    root = tmp_path / "shared"
    (root / "inductor" / "fx").mkdir(parents=True)
    (root / "inductor" / "fx" / "graph.py").write_text("compiled = 1\n")
    (root / "triton").mkdir()
    (root / "triton" / "kernel.so").write_bytes(b"\x7fELF")
    (tmp_path / "secret").write_text("val split\n")
    os.symlink(tmp_path / "secret", root / "inductor" / "leak")
    os.symlink(tmp_path, root / "triton" / "outside")
    return root


def test_private_cache_is_a_copy_of_the_shared_one(shared: Path) -> None:
    """The private folder holds the shared entries and torch is pointed at it, not at the shared folder."""
    private, env, note = compile_cache.private_cache(str(shared))
    try:
        assert (private / "inductor" / "fx" / "graph.py").read_text() == "compiled = 1\n"
        assert env == {"TORCHINDUCTOR_CACHE_DIR": str(private / "inductor"), "TRITON_CACHE_DIR": str(private / "triton")}
        assert note.startswith("compile cache: warm (2 files")
        (private / "inductor" / "fx" / "graph.py").write_text("poisoned = 1\n")
        assert (shared / "inductor" / "fx" / "graph.py").read_text() == "compiled = 1\n"
    finally:
        shutil.rmtree(private)


def test_symlinks_in_the_shared_cache_are_not_copied(shared: Path) -> None:
    """A symlink (to a file or a folder outside the cache) never reaches the private copy."""
    private, _env, _note = compile_cache.private_cache(str(shared))
    try:
        assert not (private / "inductor" / "leak").exists()
        assert not (private / "triton" / "outside").exists()
    finally:
        shutil.rmtree(private)


def test_no_shared_cache_compiles_cold(tmp_path: Path) -> None:
    """Without a shared folder the run gets an empty private cache."""
    private, env, note = compile_cache.private_cache(str(tmp_path / "missing"))
    try:
        assert note == "compile cache: cold (no shared cache)"
        assert all(not any(Path(path).iterdir()) for path in env.values())
    finally:
        shutil.rmtree(private)


def test_oversized_shared_cache_is_not_copied(shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shared cache over the size cap is ignored rather than filling the run's tmpfs."""
    monkeypatch.setattr(compile_cache, "MAX_CACHE_BYTES", 3)
    private, _env, note = compile_cache.private_cache(str(shared))
    try:
        assert "over the cap" in note and not (private / "inductor" / "fx").exists()
    finally:
        shutil.rmtree(private)


def test_publish_hands_entries_back_and_harvest_never_overwrites(shared: Path, tmp_path: Path) -> None:
    """A publishing run leaves its entries in its out dir; the host adds new files only to the shared cache."""
    private = tmp_path / "private"
    (private / "inductor" / "fx").mkdir(parents=True)
    (private / "inductor" / "fx" / "graph.py").write_text("rewritten = 1\n")
    (private / "inductor" / "fx" / "new.py").write_text("new = 1\n")
    out = tmp_path / "out"
    out.mkdir()
    assert "2 files" in compile_cache.publish(private, out / compile_cache.PUBLISHED_DIR)
    assert compile_cache.harvest(out / compile_cache.PUBLISHED_DIR, shared) == 1
    assert (shared / "inductor" / "fx" / "graph.py").read_text() == "compiled = 1\n"
    assert (shared / "inductor" / "fx" / "new.py").read_text() == "new = 1\n"


def test_harvest_ignores_a_missing_or_symlinked_folder(shared: Path, tmp_path: Path) -> None:
    """No published folder, or a symlink in its place, adds nothing to the shared cache."""
    assert compile_cache.harvest(tmp_path / "absent", shared) == 0
    os.symlink(shared, tmp_path / "link")
    assert compile_cache.harvest(tmp_path / "link", tmp_path / "other") == 0
    assert not (tmp_path / "other").exists()
