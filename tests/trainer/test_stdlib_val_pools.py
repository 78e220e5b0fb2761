"""The embedded `stdlib` source's val pools: primary by default, the fallback without it, an error without
either, the choice recorded and pinned, and every pool part removed by the image recipe."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sandbox.images import DOCKERFILE
from trainer import prepare
from trainer.prepare import STDLIB_VAL_POOLS, DataError, prepare_data

PRIMARY, FALLBACK = STDLIB_VAL_POOLS
ORDINARY = ("argparse.py", "textwrap.py", "json", "email", "fractions.py", "shlex.py")  # train text of a fake stdlib


def _fake_stdlib(folder: Path, *pools: prepare.StdlibValPool) -> Path:
    """A standard library folder holding a few ordinary modules and the host's parts of `pools`."""
    host = prepare.host_stdlib_root()
    ignore = shutil.ignore_patterns("__pycache__")
    for name in [*ORDINARY, *(part.rstrip("/") for pool in pools for part in pool.parts())]:
        source = host / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=ignore)
        elif source.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    return folder


def test_the_image_recipe_removes_every_val_pool_part() -> None:
    """The Dockerfile's removal list is exactly the parts of every val pool."""
    match = re.search(r'val_pools="([^"]*)"', DOCKERFILE.read_text())
    assert match is not None
    removed = set(match.group(1).replace("\\\n", " ").split())
    assert removed == {part.rstrip("/") for pool in STDLIB_VAL_POOLS for part in pool.parts()}


def test_the_primary_pool_is_used_when_present(tmp_path: Path) -> None:
    """With idlelib, tkinter and the test suite there, val comes from them even though the fallback is there too."""
    root = _fake_stdlib(tmp_path / "lib", PRIMARY, FALLBACK)
    pinned = prepare.collect_pinned_split("stdlib", tmp_path, lambda _: None, stdlib_root=root)
    assert pinned is not None and pinned.meta["stdlib_val_pool"]["name"] == "primary"
    pool_text = [path.read_text(encoding="utf-8", errors="replace") for path in PRIMARY.files(root)]
    assert set(pinned.val) <= set(pool_text)


def test_without_the_primary_pool_prepare_uses_the_fallback(tmp_path: Path) -> None:
    """A stdlib lacking idlelib, tkinter and test/ gives a val split of >= 1 MB from the fallback pool, recorded."""
    root = _fake_stdlib(tmp_path / "lib", FALLBACK)
    lines: list[str] = []
    out = prepare_data("stdlib", tmp_path / "data", vocab_size=300, progress=lines.append, stdlib_root=root)
    meta = json.loads((out / "val" / "meta.json").read_text())
    assert meta["stdlib_val_pool"]["name"] == "fallback" and meta["num_bytes"] >= prepare.STDLIB_MIN_VAL_BYTES
    assert any("fallback val pool" in line and " MB)" in line for line in lines)


def test_fallback_val_documents_are_pieces_of_the_fallback_pool_only(tmp_path: Path) -> None:
    """Every fallback val document is a line-cut piece of a fallback file; none trains."""
    root = _fake_stdlib(tmp_path / "lib", FALLBACK)
    pinned = prepare.collect_pinned_split("stdlib", tmp_path, lambda _: None, stdlib_root=root)
    assert pinned is not None and len(pinned.val) > 100
    pool_text = "\n".join(path.read_text(encoding="utf-8") for path in FALLBACK.files(root))
    assert all(doc in pool_text and len(doc) < 2 * (FALLBACK.chunk_chars or 0) for doc in pinned.val)
    assert not set(pinned.val) & set(pinned.train)


def test_the_split_is_pinned_by_the_stdlib(tmp_path: Path) -> None:
    """Two copies of the same standard library give the same val documents in the same order."""
    first = prepare.collect_pinned_split("stdlib", tmp_path, lambda _: None,
                                         stdlib_root=_fake_stdlib(tmp_path / "a", FALLBACK))
    second = prepare.collect_pinned_split("stdlib", tmp_path, lambda _: None,
                                          stdlib_root=_fake_stdlib(tmp_path / "b", FALLBACK))
    assert first is not None and second is not None and first.val == second.val


def test_without_either_pool_the_error_says_what_to_install(tmp_path: Path) -> None:
    """A stdlib holding neither pool is refused with the packages that give one."""
    root = _fake_stdlib(tmp_path / "lib")
    with pytest.raises(DataError, match=r"python3-tk.*libpython3\.X-stdlib.*another data source"):
        prepare.collect_pinned_split("stdlib", tmp_path, lambda _: None, stdlib_root=root)
