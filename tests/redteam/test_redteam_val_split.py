"""Class 5: the val split of the embedded `stdlib` source is unreadable from the train stage, from either val pool.

Distinctive lines of every val document are searched for in every text file of a train container's whole
filesystem (the image, the trainer mount). The primary pool is drawn from the host's standard library; the
fallback pool from a copy of it without the primary pool's parts (a host without idle, tkinter and the tests). A positive control runs in the same container: the documents the
old split rule (a content-hash sample of the very standard library the image ships) would have held out are
found there, so the search is known to work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import docker
import pytest
from docker.types import Mount as DockerMount

from tests.redteam.redteam_helpers import REPO_ROOT
from trainer import prepare

pytestmark = [pytest.mark.docker, pytest.mark.slow]

LINES_PER_DOCUMENT = 3
SEARCH = r"""
import json, os, sys
wanted = json.load(open("/patterns/lines.json"))
lines = {line for group in wanted.values() for line in group}
found = set()
for root, dirs, files in os.walk("/", followlinks=False):
    if root == "/":
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev", "patterns")]
    for name in files:
        path = os.path.join(root, name)
        try:
            if os.path.islink(path) or os.path.getsize(path) > 64 * 1024 * 1024:
                continue
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        if b"\0" in data[:4096]:
            continue
        for raw in data.decode("utf-8", "replace").splitlines():
            line = raw.strip()
            if line in lines:
                found.add(line)
print(json.dumps({key: sum(line in found for line in group) for key, group in wanted.items()}))
"""


def _distinctive_lines(document: str, common: set[str]) -> list[str]:
    lines = sorted({line.strip() for line in document.splitlines()
                    if len(line.strip()) >= 50 and line.strip() not in common}, key=lambda text: (-len(text), text))
    return lines[:LINES_PER_DOCUMENT]


def _search(image: str, groups: dict[str, list[str]], folder: Path) -> dict[str, int]:
    (folder / "lines.json").write_text(json.dumps(groups))
    folder.chmod(0o755)  # the sandbox user reads it
    (folder / "lines.json").chmod(0o644)
    client = docker.from_env(timeout=600)
    try:
        output = client.containers.run(
            image, ["python3", "-c", SEARCH], user="1000:1000", network_mode="none", read_only=True, remove=True,
            cap_drop=["ALL"], security_opt=["no-new-privileges"],
            mounts=[DockerMount("/opt/autoresearch/trainer", str(REPO_ROOT / "trainer"), type="bind", read_only=True),
                    DockerMount("/patterns", str(folder), type="bind", read_only=True)])
    finally:
        client.close()
    return dict(json.loads(output.decode().strip().splitlines()[-1]))


def _stdlib_root(pool: str, folder: Path) -> Path:
    """The host's standard library (primary), or a copy of it without the primary pool's parts (fallback)."""
    host = prepare.host_stdlib_root()
    if pool == "primary":
        return host
    primary = [part.rstrip("/") for part in prepare.STDLIB_VAL_POOLS[0].parts()]
    return Path(shutil.copytree(host, folder / "stdlib", symlinks=True,
                                ignore=shutil.ignore_patterns(*primary, "site-packages", "__pycache__")))


@pytest.mark.parametrize("pool", ["primary", "fallback"])
def test_no_stdlib_val_document_is_in_the_train_container(pool: str, trainer_image: str, tmp_path: Path) -> None:
    """Every val document's distinctive lines are absent from the train container; the old rule's are present."""
    pinned = prepare.collect_pinned_split("stdlib", tmp_path, lambda _: None, stdlib_root=_stdlib_root(pool, tmp_path))
    assert pinned is not None and pinned.meta["stdlib_val_pool"]["name"] == pool and len(pinned.val) > 20
    train, val = pinned.train, pinned.val
    common = {line.strip() for doc in train for line in doc.splitlines()}
    old_rule_val = [doc for path in prepare._stdlib_files() for doc in prepare._text_documents(path)
                    if doc.strip() and prepare.is_val_document(doc)]
    groups: dict[str, list[str]] = {}
    for i, doc in enumerate(val):
        if lines := _distinctive_lines(doc, common):
            groups[f"val-{i}"] = lines
    for i, doc in enumerate(old_rule_val[:40]):
        if lines := _distinctive_lines(doc, set()):
            groups[f"control-{i}"] = lines
    found = _search(trainer_image, groups, tmp_path)
    leaked = {key: hits for key, hits in found.items() if key.startswith("val-") and hits == len(groups[key])}
    assert leaked == {}, f"val documents readable in the train container: {sorted(leaked)[:5]}"
    controls = [key for key in found if key.startswith("control-")]
    assert controls and sum(found[key] == len(groups[key]) for key in controls) >= 0.8 * len(controls)
