"""Research lines and the notebook: the store's versions, the `autoresearch notebook` CLI, the report section."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.errors import StoreError
from daemon.ops.report import write_report
from daemon.research.line import join_research_line, line_seen_hashes, line_start, record_notes
from daemon.store import open_store
from daemon.store.sql import Store
from tests.agents.support import BASELINE


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    assert main(["--workspace", str(tmp_path), "db", "upgrade"]) == 0
    return tmp_path


@pytest.fixture()
def store(workspace: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{workspace / 'autoresearch.db'}")
    yield opened
    opened.close()


def test_sessions_continue_the_current_line(store: Store) -> None:
    """A second session joins the first one's line; with continue_line off it starts its own."""
    first, second, third = (store.create_session(f"s{n}", "once", "p", {}) for n in range(3))
    line = join_research_line(store, first.id, continue_line=True)
    assert join_research_line(store, second.id, continue_line=True) == line
    assert join_research_line(store, third.id, continue_line=False) != line
    assert store.line_sessions(line) == [first.id, second.id]
    assert join_research_line(store, first.id, continue_line=False) == line  # a session never changes line


def test_a_new_night_starts_from_the_lines_last_best_with_its_dedup(store: Store) -> None:
    """The line's start is the latest earlier night's best; hashes of every night count as seen."""
    night1 = store.create_session("n1", "once", "p", {})
    line = join_research_line(store, night1.id, continue_line=True)
    best = store.create_experiment(night1.id, "baseline", BASELINE + "# better\n", source_hash="h-best")
    store.claim_next(night1.id, "t", "cpu", None, 60)
    store.transition(best.id, "running", "evaluating")
    store.transition(best.id, "evaluating", "kept", val_bpb=1.1)
    night2 = store.create_session("n2", "once", "p", {})
    join_research_line(store, night2.id, continue_line=True)
    start = line_start(store, line, night2.id)
    assert start is not None and start.id == best.id and start.source.endswith("# better\n")
    assert "h-best" in line_seen_hashes(store, line)


def test_notebook_versions_newest_wins(store: Store) -> None:
    """Each write is a version; the newest is the notebook; blank agent notes write nothing."""
    session = store.create_session("s", "once", "p", {})
    line = join_research_line(store, session.id, continue_line=True)
    experiment = store.create_experiment(session.id, "candidate", BASELINE, source_hash="x")
    record_notes(store, line, session.id, experiment.id, "LR up helped.")
    record_notes(store, line, session.id, experiment.id, "   ")
    store.write_notebook(line, "Try warm-up next.", "researcher")
    notebook = store.notebook(line)
    assert notebook is not None and (notebook.text, notebook.author) == ("Try warm-up next.", "researcher")
    assert [entry.text for entry in store.notebook_history(line)] == ["Try warm-up next.", "LR up helped."]


@pytest.mark.parametrize(("author", "text", "message"), [
    ("intruder", "x", "unknown notebook author"),
    ("researcher", "x" * 20_001, "over the limit"),
])
def test_bad_notebook_writes_are_refused(store: Store, author: str, text: str, message: str) -> None:
    """An unknown author or an oversized text is refused with a clear error and writes nothing."""
    line = store.new_line("test")
    with pytest.raises(StoreError, match=message):
        store.write_notebook(line, text, author)
    assert store.notebook(line) is None


def test_cli_show_edit_history_and_fresh(workspace: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """Researchers read the notebook, replace it from a file, list versions and start a new line."""
    session = store.create_session("s", "once", "p", {})
    line = join_research_line(store, session.id, continue_line=True)
    store.write_notebook(line, "agent notes v1", "agent")
    args = ["--workspace", str(workspace), "notebook"]
    assert main([*args, "show"]) == 0
    assert "agent notes v1" in capsys.readouterr().out
    edited = workspace / "notes.md"
    edited.write_text("researcher says: try a longer warm-up\n")
    assert main([*args, "edit", "--file", str(edited)]) == 0
    assert main([*args, "edit", "--file", str(edited)]) == 0
    assert "unchanged: nothing written" in capsys.readouterr().out
    assert main([*args, "history"]) == 0
    history = capsys.readouterr().out
    assert "researcher" in history and "agent notes v1" in history
    assert main([*args, "fresh", "--reason", "new data"]) == 0
    assert store.current_line() != line
    assert main([*args, "show"]) == 0
    assert "(the notebook is empty)" in capsys.readouterr().out


def test_cli_edit_of_a_missing_file_fails_clearly(workspace: Path, store: Store,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A missing --file is a clear error and the notebook is unchanged."""
    line = store.new_line("test")
    store.write_notebook(line, "keep me", "agent")
    assert main(["--workspace", str(workspace), "notebook", "edit", "--file", str(workspace / "nope.md")]) != 0
    assert "cannot read" in capsys.readouterr().err
    notebook = store.notebook(line)
    assert notebook is not None and notebook.text == "keep me"


def test_report_shows_the_notebook_fenced(workspace: Path, store: Store) -> None:
    """The morning report carries the line's notebook verbatim inside a fence (it is LLM-written)."""
    session = store.create_session("s", "once", "p", {})
    line = join_research_line(store, session.id, continue_line=True)
    store.write_notebook(line, "```\n# not a heading: notes\n<script>x</script>", "agent")
    report = write_report(store, session.id, workspace / "reports").read_text()
    section = report.split("## The agent's notebook", 1)[1]
    assert "````text\n```\n# not a heading: notes\n<script>x</script>\n````" in section


def test_report_counts_crashes_caught_by_smoke_runs(workspace: Path, store: Store) -> None:
    """The report says how many failures the smoke runs caught and how many cost a full run."""
    session = store.create_session("s", "once", "p", {})
    for status in ("crashed", "passed", "oom"):
        smoke_id = store.start_smoke_run(session.id, "idea", "hash", 0)
        store.finish_smoke_run(smoke_id, status, 3.0, "boom" if status != "passed" else "")
    report = write_report(store, session.id, workspace / "reports").read_text()
    assert "- smoke runs: 3 (crashed 1, oom 1, passed 1)" in report
    assert "caught by a smoke run (seconds each): 2" in report and "cost a full run: 0" in report
