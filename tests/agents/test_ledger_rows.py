"""The ledger the agent can trust (issue 22, item 6), from a real SQLite store through the real prompt.

Bookkeeping runs fold into their experiment's row; deltas are against the parent's recorded value (a mean,
as "best" is shown); the table is oldest first and its settled rows sit before a cache breakpoint, so that
a new result leaves the cached prefix byte for byte unchanged; the counts say what is shown; the proposal
a lane took last is shown to the next one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.agents import Proposal
from daemon.agents.fences import new_nonce
from daemon.agents.ledger_text import CHUNK
from daemon.agents.prompt import build_prompt
from daemon.config import JudgeConfig
from daemon.research.ledger import build_ledger
from daemon.research.proposer import Prepared, with_taken
from daemon.store import open_store
from daemon.store.sql import Store
from tests.agents.support import BASELINE, make_context, run_experiment

ROW = re.compile(r"^(\d+) \| (\d+|-) \| (\w+) \| ", re.M)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
    opened.upgrade()
    yield opened
    opened.close()


def night_with_bookkeeping(store: Store) -> tuple[int, dict[str, int]]:
    """Baseline 1.30 with noise runs 1.32 and 1.31; a kept candidate 1.27 confirmed at 1.29; re-measures of it
    at 1.30 and 1.30; then a child at 1.28; then one more re-measure at 1.20 (after the child ran)."""
    session = store.create_session("n", "once", "program", {})
    base = run_experiment(store, session.id, "baseline", "kept", val_bpb=1.30, description="baseline",
                          source_hash="base")
    for value in (1.32, 1.31):
        run_experiment(store, session.id, "noise", "measured", val_bpb=value, description="noise",
                       source=base.source, source_hash="base")
    kept = run_experiment(store, session.id, "candidate", "kept", parent=base.id, val_bpb=1.27,
                          description="raise MATRIX_LR", diff="-MATRIX_LR = 0.02\n+MATRIX_LR = 0.03\n")
    run_experiment(store, session.id, "confirm", "measured", parent=kept.id, val_bpb=1.29, description="confirm",
                   source=kept.source, source_hash=kept.source_hash)
    for value in (1.30, 1.30):
        run_experiment(store, session.id, "remeasure", "measured", parent=kept.id, val_bpb=value,
                       description="re-measure", source=kept.source, source_hash=kept.source_hash)
    child = run_experiment(store, session.id, "candidate", "discarded", parent=kept.id, val_bpb=1.28,
                           description="warmup 0.05")
    run_experiment(store, session.id, "remeasure", "measured", parent=kept.id, val_bpb=1.20,
                   description="re-measure", source=kept.source, source_hash=kept.source_hash)
    return session.id, {"base": base.id, "kept": kept.id, "child": child.id}


def test_bookkeeping_runs_fold_into_their_experiments_row(store: Store) -> None:
    """Noise runs fold into the baseline's row and confirmations into their candidate's: runs and mean."""
    session_id, ids = night_with_bookkeeping(store)
    view = build_ledger(store, [session_id], session_id, JudgeConfig())
    assert [(run.id, run.kind, run.runs) for run in view.runs] == [
        (ids["base"], "baseline", 3), (ids["kept"], "candidate", 2), (ids["child"], "candidate", 1)]
    assert view.runs[0].val_bpb == pytest.approx(1.31) and view.runs[1].val_bpb == pytest.approx(1.28)
    assert dict(view.bookkeeping) == {"noise": 2, "confirm": 1, "remeasure": 3} and view.runs_recorded == 9


def test_deltas_are_against_the_parents_recorded_value_when_it_ran(store: Store) -> None:
    """A candidate's delta is its mean minus its parent's mean at the time (a later re-measure changes nothing)."""
    session_id, ids = night_with_bookkeeping(store)
    runs = {run.id: run for run in build_ledger(store, [session_id], session_id, JudgeConfig()).runs}
    assert runs[ids["kept"]].delta == pytest.approx(1.28 - 1.31)  # against the baseline's 3-run mean
    assert runs[ids["child"]].delta == pytest.approx(1.28 - 1.30)  # the kept one's fresh re-measures, not 1.27


def test_header_counts_match_the_rows_shown(store: Store) -> None:
    """The counts in the header are the experiments and runs recorded and the rows the tables really show."""
    session_id, _ = night_with_bookkeeping(store)
    text = prompt_text(store, session_id)
    assert "3 experiments finished, 9 runs recorded in all (2 noise, 1 confirm, 3 remeasure runs folded" in text
    shown = int(re.search(r"Rows shown: (\d+)", text).group(1))  # type: ignore[union-attr]
    assert shown == len(ROW.findall(text)) == 3


def grow(store: Store, session_id: int, parent: int, count: int, start: int) -> None:
    for number in range(start, start + count):
        run_experiment(store, session_id, "candidate", "discarded", parent=parent, val_bpb=1.3 + number * 1e-5,
                       description=f"idea {number}")


def test_new_results_leave_the_cached_prefix_unchanged(store: Store) -> None:
    """Settled rows sit before a cache breakpoint, oldest first; a new result changes only what follows it."""
    session = store.create_session("n", "once", "program", {})
    base = run_experiment(store, session.id, "baseline", "kept", val_bpb=1.30, description="baseline")
    grow(store, session.id, base.id, 2 * CHUNK + 3, 0)
    nonce = new_nonce()
    before = build_prompt(make_context(ledger=build_ledger(store, [session.id], session.id, JudgeConfig()),
                                       fence_nonce=nonce), "prepare")
    grow(store, session.id, base.id, 1, 2 * CHUNK + 3)
    run_experiment(store, session.id, "candidate", "running", parent=base.id, description="in flight")
    after = build_prompt(make_context(ledger=build_ledger(store, [session.id], session.id, JudgeConfig()),
                                      fence_nonce=nonce), "prepare")
    cached = [block for block in after.messages[0]["content"] if "cache_control" in block]
    assert len(cached) == 2 and "settled experiments" in cached[0]["text"]
    assert before.system == after.system and before.messages[0]["content"][:2] == after.messages[0]["content"][:2]
    stable_ids = [int(match[0]) for match in ROW.findall(cached[0]["text"])]
    # Oldest first, whole chunks, the newest chunk left in the recent part: 24 rows -> 10 cached.
    assert stable_ids == sorted(stable_ids) and len(stable_ids) == CHUNK
    assert "idea 23" in after.messages[0]["content"][-1]["text"] and "in flight" in after.messages[0]["content"][-1]["text"]


def test_cached_part_grows_by_appending(store: Store) -> None:
    """When a chunk fills, the cached table grows at its end: the old rows keep their text and order."""
    session = store.create_session("n", "once", "program", {})
    base = run_experiment(store, session.id, "baseline", "kept", val_bpb=1.30, description="baseline")
    grow(store, session.id, base.id, 2 * CHUNK, 0)
    first = prompt_blocks(store, session.id)[0]["text"]
    grow(store, session.id, base.id, CHUNK, 2 * CHUNK)
    second = prompt_blocks(store, session.id)[0]["text"]
    assert second.startswith(first.rsplit("\n", 1)[0]) and len(ROW.findall(second)) == len(ROW.findall(first)) + CHUNK


def test_unsettled_rows_stay_out_of_the_cached_part(store: Store) -> None:
    """A candidate whose confirmation is still queued is not settled: it and later rows stay in the recent part."""
    session = store.create_session("n", "once", "program", {})
    base = run_experiment(store, session.id, "baseline", "kept", val_bpb=1.30, description="baseline")
    grow(store, session.id, base.id, 3, 0)
    close = run_experiment(store, session.id, "candidate", "discarded", parent=base.id, val_bpb=1.29,
                           description="close call")
    grow(store, session.id, base.id, 3 * CHUNK, 3)
    run_experiment(store, session.id, "confirm", "queued", parent=close.id, description="confirm",
                   source=close.source, source_hash=close.source_hash)
    blocks = prompt_blocks(store, session.id)
    assert "cache_control" in blocks[0] and "current best train.py" in blocks[0]["text"]  # no settled chunk yet
    assert "close call" in blocks[-1]["text"]


def test_the_proposal_a_lane_took_is_shown_until_the_store_lists_it(store: Store) -> None:
    """A proposal taken by its lane but not yet recorded is in-flight work for the next proposal, and its
    source counts as tried; once recorded, it is shown once, from the store."""
    session_id, ids = night_with_bookkeeping(store)
    source = BASELINE.replace("MATRIX_LR = 0.02", "MATRIX_LR = 0.025")
    taken = Prepared(Proposal("lr 0.025", "between the two", (), source), ids["kept"], None, BASELINE)
    ctx = make_context(ledger=build_ledger(store, [session_id], session_id, JudgeConfig()))
    shown = with_taken(ctx, taken, "gpu0")
    assert shown.ledger is not None and shown.ledger.in_flight[-1].description == "lr 0.025"
    assert "+MATRIX_LR = 0.025" in shown.ledger.in_flight[-1].diff and len(shown.seen_hashes) == 1
    text = build_prompt(shown, "prepare").messages[0]["content"][-1]["text"]
    assert "proposal taken by its lane" in text and "between the two" in text
    run_experiment(store, session_id, "candidate", "running", parent=ids["kept"], description="lr 0.025",
                   source=source)
    recorded = make_context(ledger=build_ledger(store, [session_id], session_id, JudgeConfig()))
    assert with_taken(recorded, taken, "gpu0") == recorded


def prompt_blocks(store: Store, session_id: int) -> list[dict[str, object]]:
    view = build_ledger(store, [session_id], session_id, JudgeConfig())
    blocks: list[dict[str, object]] = build_prompt(make_context(ledger=view, fence_nonce="f" * 32),
                                                   "prepare").messages[0]["content"]
    return blocks


def prompt_text(store: Store, session_id: int) -> str:
    return "\n".join(str(block["text"]) for block in prompt_blocks(store, session_id))
