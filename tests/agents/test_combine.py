"""Combines: `base: "combine:<id>"` parsed, checked against the ledger's near-misses and applied with the edits;
the Anthropic agent feeds a bad combine back to the model (through the real SDK and the fake API server)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from daemon.agents import ChangeEntry, Edit, LedgerView
from daemon.agents.anthropic_agent import AnthropicAgent
from daemon.agents.combine import candidate_source, combine_diff, parse_base
from daemon.agents.ledger_text import render_ledger
from daemon.agents.tool_input import parse_tool_input
from daemon.errors import InvalidProposal
from daemon.research.archive import unified_diff
from tests.agents.support import BASELINE, make_context
from tests.fakes.anthropic_server import FakeAnthropicServer, tool_reply

NEAR_SOURCE = BASELINE + "\nNEAR_MISS_KNOB = 1\n"
NEAR_ID = 7
LR_EDIT = {"search": "MATRIX_LR = 0.02", "replace": "MATRIX_LR = 0.03"}


def _ledger(*near: ChangeEntry) -> LedgerView:
    return LedgerView(nights=1, runs=(), kept=(), near_misses=near, crashes=(), in_flight=(), noise_sigma=0.01,
                      noise_n=3, keep_margin=0.02, margin_rule="2 sigma")


NEAR = ChangeEntry(id=NEAR_ID, val_bpb=1.249, delta=-0.001, description="add a knob",
                   diff=unified_diff(BASELINE, NEAR_SOURCE))


def test_base_absent_or_best_builds_on_the_best() -> None:
    """No base, or base "best", names no near-miss."""
    assert parse_base({}) is None
    assert parse_base({"base": "best"}) is None


def test_base_combine_names_the_near_miss() -> None:
    """base "combine:<id>" (a leading # tolerated) gives the id."""
    assert parse_base({"base": "combine:12"}) == 12
    assert parse_base({"base": "combine:#12"}) == 12


@pytest.mark.parametrize("base", ["combine:", "combine:x", "merge:12", "combine:12,13", 12, ["combine:12"]])
def test_malformed_base_is_refused(base: object) -> None:
    """A base that is neither "best" nor "combine:<id>" is an invalid proposal saying the accepted forms."""
    with pytest.raises(InvalidProposal, match='base must be'):
        parse_base({"base": base})


def test_unknown_id_is_refused_with_the_ids_allowed() -> None:
    """An id the ledger does not list as a near-miss is refused, and the reason lists the ids allowed."""
    ctx = make_context(ledger=_ledger(NEAR))
    with pytest.raises(InvalidProposal, match=f"#99 is not an archived near-miss.*may combine: {NEAR_ID}"):
        combine_diff(ctx, 99)


def test_combine_without_near_misses_is_refused() -> None:
    """With no archived near-miss (or no ledger) any combine is refused, telling the agent to use "best"."""
    for ctx in (make_context(), make_context(ledger=_ledger())):
        with pytest.raises(InvalidProposal, match='there is none yet: use base "best"'):
            combine_diff(ctx, NEAR_ID)


def test_candidate_has_the_edits_and_the_near_miss() -> None:
    """The combined source is the best with the agent's edits plus the near-miss's change."""
    source = candidate_source(BASELINE, [Edit(**LR_EDIT)], NEAR.diff)
    assert "MATRIX_LR = 0.03" in source and "NEAR_MISS_KNOB = 1" in source


def test_combination_alone_needs_no_edits() -> None:
    """A combine with no edits is the best plus the near-miss's change; tool input without edits parses."""
    assert candidate_source(BASELINE, [], NEAR.diff) == NEAR_SOURCE
    description, _, edits = parse_tool_input({"description": "combine #7", "base": f"combine:{NEAR_ID}"})
    assert (description, edits) == ("combine #7", ())


def test_no_edits_without_combine_is_still_refused() -> None:
    """Without a combine, empty edits stay an invalid proposal."""
    with pytest.raises(InvalidProposal, match="edits must be a non-empty list"):
        parse_tool_input({"description": "nothing", "base": "best"})


def test_near_miss_that_no_longer_applies_is_refused() -> None:
    """A near-miss whose context the edits changed is refused, naming the near-miss's change."""
    clash = Edit(search=BASELINE[-40:], replace="# rewritten tail\n")
    with pytest.raises(InvalidProposal, match="near-miss's change does not apply"):
        candidate_source(BASELINE, [clash], NEAR.diff)


def test_ledger_lists_the_ids_to_combine() -> None:
    """The ledger text names the near-miss ids the agent may combine and how."""
    text = render_ledger(_ledger(NEAR), lambda body, _limit: body, 12000).recent
    assert f'set base to "combine:<id>"; the ids you may combine: {NEAR_ID}.' in text


def test_agent_repairs_an_unknown_combine(server: FakeAnthropicServer,
                                          make_anthropic: Callable[..., AnthropicAgent]) -> None:
    """A combine naming a non-archived id goes back to the model with the reason; the corrected one is kept."""
    good: dict[str, Any] = {"description": "lr up on near-miss #7", "hypothesis": "both help",
                            "edits": [LR_EDIT], "base": f"combine:{NEAR_ID}"}
    server.enqueue(tool_reply({**good, "base": "combine:1"}), tool_reply(good))
    proposal = make_anthropic().propose(make_context(ledger=_ledger(NEAR)))
    feedback = server.requests[1].body["messages"][-1]["content"][0]
    assert feedback["is_error"] is True and "#1 is not an archived near-miss" in feedback["content"]
    assert proposal.combine_with == NEAR_ID
    assert "MATRIX_LR = 0.03" in proposal.source and "NEAR_MISS_KNOB = 1" in proposal.source


def test_tool_schema_offers_the_base_field(server: FakeAnthropicServer,
                                           make_anthropic: Callable[..., AnthropicAgent]) -> None:
    """The tool's schema has the optional base field; a proposal without it builds on the best."""
    server.enqueue(tool_reply({"description": "lr up", "hypothesis": "h", "edits": [LR_EDIT]}))
    proposal = make_anthropic().propose(make_context(ledger=_ledger(NEAR)))
    schema = server.requests[0].body["tools"][0]["input_schema"]
    assert "base" in schema["properties"] and "base" not in schema["required"]
    assert proposal.combine_with is None
