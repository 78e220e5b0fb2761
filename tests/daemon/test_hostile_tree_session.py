"""Class 5 in a real session: a candidate that leaves a folder chain thousands of levels deep (with link loops,
FIFOs, locked folders and names that are not UTF-8) in its out dir, TMPDIR and compile cache is one `crashed`
row with a one-line reason; the session goes on to its end and no run folder is left behind.
Real Postgres store, real workspace, real local sandbox; the agent is scripted at its protocol seam."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.agents import Edit, Proposal, ProposalContext
from daemon.agents.edits import normalized_hash
from daemon.research import ResearchSession
from daemon.research.stop import StopCondition
from daemon.research.workspace import Workspace
from daemon.service.runtime import open_runtime
from sandbox import treewalk
from tests.redteam import hostile_trees

pytestmark = [pytest.mark.postgres]
HOSTILE = hostile_trees.candidate_source("deep,links,specials,odd_names,locked", tmp_shapes="mixed",
                                         cache_shapes="deep")


class HostileAgent:
    """Proposes the hostile train.py, whole, every time it is asked."""

    name = "scripted"

    def propose(self, ctx: ProposalContext) -> Proposal:
        return Proposal("plant hostile trees", "the daemon survives them", (Edit("", HOSTILE),), HOSTILE)


@pytest.fixture()
def fast_dir() -> Iterator[Path]:
    """tmpfs where there is one: the run makes and removes some 15,000 folders (slow on a loaded disk)."""
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="treewalk-session-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK)
                                 else None))
    yield base
    treewalk.remove_tree(base)


@pytest.fixture()
def workspace(fast_dir: Path, baseline_source: str, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """The session's workspace (its runs folder) and the local sandbox's TMPDIR folders, on `fast_dir`."""
    (fast_dir / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fast_dir / "tmp"))
    return Workspace.init(fast_dir / "ws", baseline_source=baseline_source)


def test_hostile_trees_are_one_crashed_row_and_the_session_ends_cleanly(tiny_settings: Any, workspace: Workspace,
                                                                        baseline_source: str) -> None:
    """The candidate's row is `crashed` with the walk bound it passed; the session completes; nothing leaks."""
    # A budget the tree building fits in on a loaded machine: the outcome is decided by the trees, not by time.
    runtime = open_runtime(tiny_settings(training={"time_budget_s": 60}), daemon=False)
    try:
        session = ResearchSession(settings=runtime.settings, store=runtime.store, workspace=runtime.workspace,
                                  runner=runtime.runner, agent=HostileAgent(), lanes=runtime.lanes[:1],
                                  owner=runtime.owner, max_experiments=1, pipelined=False)
        sid = session.open(resume=False).id
        store = runtime.store
        base = store.create_experiment(sid, "baseline", baseline_source, description="baseline",
                                       source_hash=normalized_hash(baseline_source))
        assert store.claim_next(sid, "earlier-owner", "lane0", None, 60.0) is not None
        store.transition(base.id, "running", "evaluating", owner="earlier-owner")
        store.transition(base.id, "evaluating", "kept", owner="earlier-owner", val_bpb=2.0)
        summary = session.run(StopCondition(grace_s=0))
        rows = [r for r in store.list_experiments(session_id=sid, limit=20) if r.kind == "candidate"]
    finally:
        runtime.close()
    assert summary.status == "completed", summary.stop_reason
    assert [(r.status, r.source == HOSTILE) for r in rows] == [("crashed", True)]
    assert rows[0].error.startswith("train stage out dir holds ") and "\n" not in rows[0].error
    left = [str(p.relative_to(workspace.runs_dir)) for p in workspace.runs_dir.glob("*/*_out")]
    assert left == [] and list((Path(tempfile.gettempdir())).iterdir()) == []
