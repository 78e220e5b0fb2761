"""The research line across nights: which line a session is on, where it starts, its dedup and its notebook.

A new session joins the current line (unless `agent.continue_line` is off, or a researcher started a new
line with `autoresearch notebook fresh`), re-measures the line's last best as its baseline, refuses
sources tried on any night of the line, and shows the agent the line's notebook. Notes the agent writes
with a proposal are stored as a new notebook version when the proposal becomes an experiment.
"""

from __future__ import annotations

from typing import Protocol

from daemon.ops.logs import get_logger
from daemon.store.lines import NotebookEntry
from daemon.store.records import ExperimentRecord

log = get_logger("autoresearch.research")


class LineStore(Protocol):
    def line_of(self, session_id: int) -> int | None: ...

    def current_line(self) -> int | None: ...

    def new_line(self, reason: str) -> int: ...

    def join_line(self, session_id: int, line_id: int) -> int: ...

    def line_sessions(self, line_id: int) -> list[int]: ...

    def best(self, session_id: int) -> ExperimentRecord | None: ...

    def seen_hashes(self, session_id: int) -> set[str]: ...

    def notebook(self, line_id: int) -> NotebookEntry | None: ...

    def write_notebook(self, line_id: int, text: str, author: str, *, session_id: int | None = None,
                       experiment_id: int | None = None) -> NotebookEntry: ...


def join_research_line(store: LineStore, session_id: int, continue_line: bool) -> int:
    """The session's line: the one it is on already, else the current line (or a new one)."""
    existing = store.line_of(session_id)
    if existing is not None:
        return existing
    line = store.current_line() if continue_line else None
    if line is None:
        line = store.new_line(f"started by session {session_id}")
    joined = store.join_line(session_id, line)
    log.info("research line", session=session_id, line=joined, nights=len(store.line_sessions(joined)))
    return joined


def line_start(store: LineStore, line_id: int, session_id: int) -> ExperimentRecord | None:
    """The best of the line's latest earlier session that has one: where this session continues from."""
    for earlier in reversed(store.line_sessions(line_id)):
        if earlier < session_id and (best := store.best(earlier)) is not None:
            return best
    return None


def line_seen_hashes(store: LineStore, line_id: int) -> frozenset[str]:
    """Normalized source hashes tried on any night of the line (the agent's dedup)."""
    seen: set[str] = set()
    for session_id in store.line_sessions(line_id):
        seen |= store.seen_hashes(session_id)
    return frozenset(seen)


def notebook_text(store: LineStore, line_id: int) -> str:
    entry = store.notebook(line_id)
    return entry.text if entry is not None else ""


def record_notes(store: LineStore, line_id: int, session_id: int, experiment_id: int, notes: str) -> None:
    """Store the agent's rewritten notebook that came with the proposal now queued as `experiment_id`."""
    if notes.strip():
        store.write_notebook(line_id, notes.strip(), "agent", session_id=session_id, experiment_id=experiment_id)
