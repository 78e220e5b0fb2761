"""The research workspace: init, git commits of kept experiments, results.tsv."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from daemon.errors import WorkspaceError
from daemon.research.workspace import Workspace

BASELINE = "print('baseline')\n"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


def test_init_creates_files_and_repo(tmp_path: Path) -> None:
    """init writes program.md, train.py, the config and commits them on main."""
    ws = Workspace.init(tmp_path / "ws", baseline_source=BASELINE)
    assert ws.train_path.read_text() == BASELINE
    assert "val_bpb" in ws.program_md()
    assert f"workspace = '{ws.root}'" in (ws.root / "autoresearch.toml").read_text()
    assert _git(ws.root, "log", "--format=%s").strip().startswith("autoresearch workspace")


def test_init_twice_keeps_edits(tmp_path: Path) -> None:
    """Re-running init never overwrites the human's program.md."""
    ws = Workspace.init(tmp_path / "ws", baseline_source=BASELINE)
    ws.program_path.write_text("my directive\n")
    Workspace.init(ws.root, baseline_source=BASELINE)
    assert ws.program_path.read_text() == "my directive\n"


def test_open_missing_workspace_says_how_to_fix(tmp_path: Path) -> None:
    """Opening a folder that is not a workspace names what is missing and suggests init."""
    with pytest.raises(WorkspaceError, match="not an autoresearch workspace") as info:
        Workspace.open(tmp_path)
    assert "autoresearch init" in info.value.hint


def test_kept_commits_land_on_session_branch_only(tmp_path: Path) -> None:
    """Kept experiments are commits on autoresearch/<tag>; main and the working tree stay untouched."""
    ws = Workspace.init(tmp_path / "ws", baseline_source=BASELINE)
    main_before = _git(ws.root, "rev-parse", "main")
    first = ws.commit_kept("night1", "print('one')\n", "lower lr")
    second = ws.commit_kept("night1", "print('two')\n", "deeper model")
    assert _git(ws.root, "show", f"{second}:train.py") == "print('two')\n"
    assert _git(ws.root, "rev-parse", f"{second}^").strip() == first
    assert ws.branch_log("night1") == ["deeper model", "lower lr"]
    assert _git(ws.root, "rev-parse", "main") == main_before
    assert ws.train_path.read_text() == BASELINE


def test_bad_session_tag_is_refused(tmp_path: Path) -> None:
    """A tag that cannot be a branch name is a clear error and commits nothing."""
    ws = Workspace.init(tmp_path / "ws", baseline_source=BASELINE)
    with pytest.raises(WorkspaceError, match="not a valid branch name"):
        ws.commit_kept("../evil", "x = 1\n", "msg")


def test_baseline_with_syntax_error_is_refused(tmp_path: Path) -> None:
    """A baseline train.py that does not parse is reported with its line number."""
    ws = Workspace.init(tmp_path / "ws", baseline_source="def broken(:\n")
    with pytest.raises(WorkspaceError, match="line 1"):
        ws.baseline_source()


def test_results_tsv_is_replaced_whole(tmp_path: Path) -> None:
    """write_results replaces results.tsv and leaves no temporary file."""
    ws = Workspace.init(tmp_path / "ws", baseline_source=BASELINE)
    ws.write_results("commit\tval_bpb\n")
    ws.write_results("commit\tval_bpb\nabc\t1.0\n")
    assert ws.results_path.read_text() == "commit\tval_bpb\nabc\t1.0\n"
    assert not list(ws.root.glob("*.tmp"))


def test_concurrent_results_writers_never_fail(tmp_path: Path) -> None:
    """Two lanes exporting results.tsv at once both succeed; the file ends as one of the written texts."""
    ws = Workspace.init(tmp_path / "ws", baseline_source=BASELINE)
    texts = {name: f"commit\tval_bpb\n{name}\t1.0\n" for name in ("a", "b")}
    errors: list[BaseException] = []

    def writer(text: str) -> None:
        try:
            for _ in range(200):
                ws.write_results(text)
        except BaseException as exc:  # the test reports any failure
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(text,)) for text in texts.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert ws.results_path.read_text() in texts.values()
    assert not list(ws.root.glob("*.tmp")) and not list(ws.root.glob(".*.tmp"))


def test_concurrent_commits_form_a_chain(tmp_path: Path) -> None:
    """Two threads committing kept sources at once both succeed and their commits form one chain."""
    ws = Workspace.init(tmp_path / "ws", baseline_source=BASELINE)
    shas: dict[str, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def keep(name: str) -> None:
        try:
            barrier.wait()
            shas[name] = ws.commit_kept("night1", f"print({name!r})\n", f"keep {name}")
        except BaseException as exc:  # the test reports any failure
            errors.append(exc)

    threads = [threading.Thread(target=keep, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    head = _git(ws.root, "rev-parse", "autoresearch/night1").strip()
    first = _git(ws.root, "rev-parse", f"{head}^").strip()
    assert {head, first} == set(shas.values())
    assert _git(ws.root, "rev-parse", f"{first}^").strip() == _git(ws.root, "rev-parse", "main").strip()
