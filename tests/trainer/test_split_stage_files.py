"""The harness's report in an out dir it shares with the candidate (a split train stage: another uid).

What the candidate leaves at the report's name must neither receive the report nor keep it from being written.
(An unreadable checkpoint in the eval stage: tests/redteam/test_redteam_model_process.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer import harness


def test_report_replaces_a_planted_link_without_writing_through_it(tmp_path: Path) -> None:
    """A symlink the candidate left at train.json is replaced; the file it points at is untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    (tmp_path / "train.json").symlink_to(victim)
    harness.write_json(tmp_path / "train.json", {"exit_code": 0})
    assert not (tmp_path / "train.json").is_symlink()
    assert json.loads((tmp_path / "train.json").read_text()) == {"exit_code": 0}
    assert victim.read_text() == "untouched" and sorted(p.name for p in tmp_path.iterdir()) == ["train.json",
                                                                                                 "victim.txt"]
