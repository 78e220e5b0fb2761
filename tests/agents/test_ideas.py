"""The idea memory (issue 22, item 7): every change a research line tried, across nights, recognised again
before a run is spent on it. Built from a real SQLite store; repeats refused through the real tool-input path."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.agents.ideas import IdeaMemory, change_of, renamed_key
from daemon.agents.ledger_text import render_ideas
from daemon.agents.offline import OfflineAgent
from daemon.agents.prompt import build_prompt
from daemon.agents.tool_input import proposal_from_tool_input
from daemon.config import JudgeConfig
from daemon.errors import InvalidProposal
from daemon.research.briefing import RepeatGuard
from daemon.research.ideas import MEASUREMENT_VERSION, idea_memory, memory_from_rows
from daemon.research.ledger import build_ledger, line_rows
from daemon.store import open_store
from daemon.store.sql import Store
from tests.agents.support import BASELINE, make_context, run_experiment
from tests.fakes.anthropic_server import FakeAnthropicServer, tool_reply

LR = "MATRIX_LR = 0.02"


def with_lr(value: str, source: str = BASELINE) -> str:
    return source.replace(LR, f"MATRIX_LR = {value}")


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'ideas.db'}")
    opened.upgrade()
    yield opened
    opened.close()


@pytest.fixture()
def line(store: Store) -> tuple[int, list[int]]:
    """Night 1 of a line: MATRIX_LR 0.02 -> 0.04 refused, a new WARMDOWN kept, a crash. Night 2: its baseline."""
    line_id = store.new_line("test")
    first = store.create_session("night-1", "once", "program", {})
    store.join_line(first.id, line_id)
    base = run_experiment(store, first.id, "baseline", "kept", val_bpb=1.30, description="baseline",
                          source=BASELINE, source_hash="base")
    run_experiment(store, first.id, "candidate", "discarded", parent=base.id, val_bpb=1.31,
                   description="raise the matrix LR", source=with_lr("0.04"))
    kept_source = BASELINE + "\nEXTRA_WARMDOWN = 0.1\n"
    run_experiment(store, first.id, "candidate", "kept", parent=base.id, val_bpb=1.25, description="warmdown knob",
                   source=kept_source)
    run_experiment(store, first.id, "candidate", "crashed", parent=base.id, description="broken rope",
                   source=BASELINE + "\nrope = undefined_name\n", error="NameError")
    second = store.create_session("night-2", "once", "program", {})
    store.join_line(second.id, line_id)
    run_experiment(store, second.id, "baseline", "kept", val_bpb=1.26, description="baseline (line best)",
                   source=kept_source, source_hash="kept")
    return line_id, [first.id, second.id]


def memory(store: Store, sessions: list[int]) -> IdeaMemory:
    return idea_memory(store, line_rows(store, sessions), len(sessions))


def test_every_idea_of_every_night_is_remembered_once(store: Store, line: tuple[int, list[int]]) -> None:
    """Night 2 sees night 1's ideas, each with its outcome, effect, uncertainty and measurement version."""
    remembered = memory(store, line[1])
    assert [(idea.description, idea.outcome) for idea in remembered.ideas] == [
        ("raise the matrix LR", "discarded"), ("warmdown knob", "kept"), ("broken rope", "crashed")]
    lr = remembered.ideas[0]
    assert lr.change.numbers[0].name == "MATRIX_LR" and lr.change.numbers[0].new == pytest.approx(0.04)
    assert lr.effect == pytest.approx(0.01) and lr.version == MEASUREMENT_VERSION and lr.runs == 1


def test_same_change_up_to_formatting_on_another_best_is_a_repeat(store: Store, line: tuple[int, list[int]]) -> None:
    """The refused LR change, re-made on night 2's best with other spacing and a comment, is recognised."""
    best = BASELINE + "\nEXTRA_WARMDOWN = 0.1\n"
    again = best.replace(LR, "MATRIX_LR   =   0.040   # retry")
    found = memory(store, line[1]).match(best, again)
    assert found is not None and found.idea.description == "raise the matrix LR"


def test_renamed_constants_are_a_repeat(store: Store, line: tuple[int, list[int]]) -> None:
    """A source equal to a tried one up to a consistently renamed constant is recognised."""
    tried = BASELINE + "\nEXTRA_WARMDOWN = 0.1\n"
    renamed = tried.replace("EXTRA_WARMDOWN", "WARMDOWN_EXTRA")
    assert renamed_key(renamed) == renamed_key(tried)
    assert memory(store, line[1]).match(BASELINE, renamed) is not None


@pytest.mark.parametrize(("value", "repeat"), [("0.041", True), ("0.037", True), ("0.05", False), ("0.03", False)])
def test_a_value_one_step_from_a_refused_one_is_a_repeat(store: Store, line: tuple[int, list[int]], value: str,
                                                         repeat: bool) -> None:
    """Within 10% of the refused 0.04 is the same idea; further away it is a new one."""
    assert (memory(store, line[1]).match(BASELINE, with_lr(value)) is not None) is repeat


def test_a_value_near_a_kept_one_is_not_refused(store: Store, line: tuple[int, list[int]]) -> None:
    """Only refused values block their neighbours: a step beside a kept value is a fair next try."""
    assert memory(store, line[1]).match(BASELINE + "\nEXTRA_WARMDOWN = 0.1\n",
                                        BASELINE + "\nEXTRA_WARMDOWN = 0.105\n") is None


def test_ideas_measured_under_an_older_version_are_shown_not_refused(store: Store, line: tuple[int, list[int]]) -> None:
    """An idea tagged with an older measurement version is listed with its tag but may be tried again."""
    lr_id = memory(store, line[1]).ideas[0].experiment_ids[0]
    store.tag_measurement_version([lr_id], MEASUREMENT_VERSION)  # already tagged: stays
    rows = line_rows(store, line[1])
    assert store.measurement_versions([lr_id]) == {lr_id: MEASUREMENT_VERSION}
    old = memory_from_rows(rows, {lr_id: MEASUREMENT_VERSION - 1}, nights=2)
    assert old.match(BASELINE, with_lr("0.04")) is None
    text = build_prompt(make_context(ledger=None, ideas=old), "prepare").messages[0]["content"][-1]["text"]
    assert f"[v{MEASUREMENT_VERSION - 1}]" in text


def test_the_agent_always_sees_the_summary(store: Store, line: tuple[int, list[int]]) -> None:
    """Every idea is in the prompt's idea memory, by what it changed, with effect ± its standard error."""
    ctx = make_context(ledger=build_ledger(store, line[1], line[1][1], JudgeConfig()), ideas=memory(store, line[1]))
    text = build_prompt(ctx, "prepare").messages[0]["content"][-1]["text"]
    assert "Idea memory: every distinct change tried on this research line (3 ideas over 2 nights" in text
    assert re.search(r"MATRIX_LR 0\.02->0\.04 \| discarded \+0\.0100", text)
    assert "EXTRA_WARMDOWN: warmdown knob | kept" in text and "broken rope | crashed" in text


def test_a_repeat_is_refused_before_it_runs_with_the_tried_idea(store: Store, line: tuple[int, list[int]]) -> None:
    """Through the real tool-input path: the proposal is refused and the error shows the tried idea, fenced."""
    ctx = make_context(best_source=BASELINE, ideas=memory(store, line[1]), fence_nonce="c" * 32)
    raw = {"description": "LR up a bit", "edits": [{"search": LR, "replace": "MATRIX_LR = 0.0405"}]}
    with pytest.raises(InvalidProposal, match="repeats an idea already tried") as refused:
        proposal_from_tool_input(raw, ctx)
    assert f"<data-{'c' * 32}>\nMATRIX_LR 0.02->0.04 | discarded" in str(refused.value)
    fine = {"description": "LR down", "edits": [{"search": LR, "replace": "MATRIX_LR = 0.015"}]}
    assert proposal_from_tool_input(fine, ctx).description == "LR down"


def test_change_ignores_docstrings_and_comments() -> None:
    """A change of comments or docstrings only is no change at all."""
    edited = BASELINE.replace(LR, LR + "  # tuned").replace("Baseline GPT pretraining", "Baseline GPT pre-training")
    assert edited != BASELINE and change_of(BASELINE, edited).empty


def test_offline_agent_skips_repeats_of_tried_ideas(store: Store, line: tuple[int, list[int]]) -> None:
    """The offline agent's first choice, once refused on the line, is not proposed again by a fresh agent."""
    first = OfflineAgent().propose(make_context(best_source=BASELINE))
    base = store.baseline(line[1][0])
    assert base is not None
    run_experiment(store, line[1][0], "candidate", "discarded", parent=base.id, val_bpb=1.35,
                   description=first.description, source=first.source)
    remembered = memory(store, line[1])
    again = OfflineAgent().propose(make_context(best_source=BASELINE, ideas=remembered))
    assert again.source != first.source and remembered.match(BASELINE, again.source) is None


def test_session_refuses_a_repeat_before_queueing_and_shows_it_next(store: Store, line: tuple[int, list[int]]) -> None:
    """The session's own check (results that came in after the proposal was written count) refuses a repeat,
    and the next proposal's prompt shows what was refused and why, fenced."""
    repeats = RepeatGuard(store, lambda: line[0])
    with pytest.raises(InvalidProposal, match=r"repeats the idea tried as #\d+ \(a value within 10%"):
        repeats.refuse_repeat(BASELINE, with_lr("0.039"), "LR to 0.039")
    nonce = "d" * 32
    text = build_prompt(make_context(refused=repeats.take_refused(), fence_nonce=nonce), "prepare").messages[0][
        "content"][-1]["text"]
    assert re.search(rf"not run: it repeats an idea this line already tried\n\n<data-{nonce}>\nLR to 0.039\n", text)
    assert repeats.take_refused() == ""  # shown once
    repeats.refuse_repeat(BASELINE, with_lr("0.015"), "LR down")  # a new idea passes


def test_summary_covers_every_idea_when_the_list_is_cut(store: Store, line: tuple[int, list[int]]) -> None:
    """With little room, the newest ideas are listed and the older ones summed up per name they changed."""
    text = render_ideas(memory(store, line[1]), lambda body, _limit: body, 60)
    assert "older: MATRIX_LR x1 values 0.04..0.04, 0 kept" in text and "every idea is still checked" in text
    assert "broken rope | crashed" in text


def test_llm_agent_is_shown_the_tried_idea_in_the_prompts_fence(store: Store, line: tuple[int, list[int]],
                                                                 server: FakeAnthropicServer,
                                                                 make_anthropic: Callable[..., Any]) -> None:
    """A repeat proposed through the real SDK comes back as a tool error quoting the tried idea inside the
    prompt's own fence; the agent's next proposal is used."""
    server.enqueue(tool_reply({"description": "LR up a bit", "edits": [{"search": LR, "replace": "MATRIX_LR = 0.0405"}]}),
                   tool_reply({"description": "LR down", "edits": [{"search": LR, "replace": "MATRIX_LR = 0.015"}]}))
    proposal = make_anthropic().propose(make_context(best_source=BASELINE, ideas=memory(store, line[1])))
    assert proposal.description == "LR down"
    first = "\n".join(block["text"] for block in server.requests[0].body["messages"][0]["content"])
    nonce = re.search(r"<data-([0-9a-f]{32})>", first).group(1)  # type: ignore[union-attr]
    answer = server.requests[1].body["messages"][2]["content"][0]
    assert answer["type"] == "tool_result" and answer["is_error"]
    assert f"<data-{nonce}>\nMATRIX_LR 0.02->0.04 | discarded" in answer["content"]
