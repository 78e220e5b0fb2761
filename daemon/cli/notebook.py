"""`autoresearch notebook`: researchers read and edit the agent's notebook, or start a new research line.

- `show` prints the current line's notebook (who wrote it, when) and how many nights the line has;
- `history` lists its versions, newest first;
- `edit` writes a new version from `--file PATH` (`-` = standard input) or from $EDITOR on the current text;
  an unchanged text writes nothing;
- `fresh` starts a new line: the next session begins from the workspace's train.py with an empty notebook.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from daemon.errors import AutoresearchError
from daemon.store.lines import MAX_NOTEBOOK_CHARS

ACTIONS = ("show", "history", "edit", "fresh")


def run_notebook(action: str, store: Any, *, file: str | None = None, reason: str = "") -> int:
    if action == "fresh":
        line = store.new_line(reason or "started over by a researcher (autoresearch notebook fresh)")
        print(f"research line {line} started: the next session begins from the workspace train.py "
              "with an empty notebook")
        return 0
    line = store.current_line()
    if line is None:
        raise AutoresearchError("no research line yet: the first session starts one",
                                hint="run `autoresearch once` first, or `autoresearch notebook fresh`")
    if action == "show":
        entry = store.notebook(line)
        nights = len(store.line_sessions(line))
        print(f"research line {line}, {nights} session(s)")
        if entry is None:
            print("(the notebook is empty)")
        else:
            print(f"notebook version {entry.id} by {entry.author}, {entry.created_at.isoformat(timespec='seconds')}"
                  + (f", with experiment {entry.experiment_id}" if entry.experiment_id else "") + ":\n")
            print(entry.text)
        return 0
    if action == "history":
        entries = store.notebook_history(line)
        for entry in entries:
            first = entry.text.strip().splitlines()[0][:80] if entry.text.strip() else ""
            print(f"{entry.id}  {entry.created_at.isoformat(timespec='seconds')}  {entry.author:<10}  {first}")
        if not entries:
            print("(the notebook is empty)")
        return 0
    if action == "edit":
        current = store.notebook(line)
        before = current.text if current is not None else ""
        text = _read_text(file) if file is not None else _edit_in_editor(before)
        if text.strip() == before.strip():
            print("unchanged: nothing written")
            return 0
        if len(text) > MAX_NOTEBOOK_CHARS:
            raise AutoresearchError(f"the notebook is {len(text)} characters, over {MAX_NOTEBOOK_CHARS}",
                                    hint="shorten it: the agent reads it at every proposal")
        entry = store.write_notebook(line, text.strip(), "researcher")
        print(f"notebook version {entry.id} written; the agent reads it at its next proposal")
        return 0
    raise AutoresearchError(f"unknown notebook action {action!r}", hint=f"one of: {', '.join(ACTIONS)}")


def _read_text(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    try:
        return Path(file).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AutoresearchError(f"cannot read {file}: {exc}", hint="give a readable UTF-8 text file") from None


def _edit_in_editor(text: str) -> str:
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if not editor:
        raise AutoresearchError("no editor: $EDITOR is not set", hint="set EDITOR, or pass --file PATH (- for stdin)")
    with tempfile.TemporaryDirectory(prefix="autoresearch-notebook-") as folder:
        path = Path(folder) / "notebook.md"
        path.write_text(text)
        result = subprocess.run([*shlex.split(editor), str(path)], check=False)
        if result.returncode != 0:
            raise AutoresearchError(f"the editor exited with status {result.returncode}: nothing written")
        return path.read_text()
