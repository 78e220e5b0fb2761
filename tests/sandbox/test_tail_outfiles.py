"""Output sanitizing and safe out-dir reading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.errors import InvalidSpec
from sandbox.outfiles import is_safe_regular_file, prepare_out_dir, read_out_files
from sandbox.tail import sanitize_tail


def test_tail_strips_escapes_and_control_characters() -> None:
    """ANSI sequences, NUL/BEL and other control characters disappear; newlines and tabs stay."""
    raw = b"\x1b[31mred\x1b[0m\tok\x00\x07\nnext\x1b]0;title\x07line"
    assert sanitize_tail(raw, 1000) == "red\tok\nnextline"


def test_tail_keeps_only_the_last_bytes() -> None:
    """The tail is capped in bytes and taken from the end."""
    assert sanitize_tail(b"a" * 100 + b"END", 5) == "aaEND"


def test_tail_decodes_invalid_utf8_leniently() -> None:
    """Broken UTF-8 becomes replacement characters instead of an exception."""
    assert sanitize_tail(b"ok \xff\xfe", 100).startswith("ok ")


def test_regular_files_are_collected(tmp_path: Path) -> None:
    """Small regular files come back by name."""
    (tmp_path / "result.json").write_text('{"status": "ok"}')
    out = read_out_files(tmp_path)
    assert out.files == {"result.json": b'{"status": "ok"}'} and out.refused == {}


def test_symlink_to_host_file_is_refused(tmp_path: Path) -> None:
    """A symlink (e.g. to /etc/passwd) is never followed."""
    (tmp_path / "result.json").symlink_to("/etc/passwd")
    out = read_out_files(tmp_path)
    assert out.files == {} and "symlink" in out.refused["result.json"]
    assert not is_safe_regular_file(tmp_path / "result.json")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO is a special file: refused, and reading does not hang on it."""
    os.mkfifo(tmp_path / "train.json")
    assert "special" in read_out_files(tmp_path).refused["train.json"]


def test_oversized_file_is_left_on_disk(tmp_path: Path) -> None:
    """A file over the collect cap is not read into memory."""
    (tmp_path / "model.pt2").write_bytes(b"x" * 2048)
    out = read_out_files(tmp_path, max_bytes=1024)
    assert "model.pt2" not in out.files and "cap" in out.refused["model.pt2"]


def test_prepare_out_dir_refuses_a_used_directory(tmp_path: Path) -> None:
    """Reusing a non-empty out dir would mix two runs' files: refused with a clear error."""
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(InvalidSpec, match="not empty"):
        prepare_out_dir(tmp_path)
    assert (tmp_path / "old.json").exists()


def test_prepare_out_dir_hands_it_to_the_sandbox_user(tmp_path: Path) -> None:
    """As root, the out dir belongs to uid 1000 so the non-root container user can write it."""
    out_dir = tmp_path / "out"
    prepare_out_dir(out_dir)
    if os.geteuid() == 0:
        assert out_dir.stat().st_uid == 1000
    assert out_dir.is_dir()
