"""The offline agent: real, valid, distinct edits of the real baseline train.py, guided by history."""

from __future__ import annotations

import ast

import pytest

from daemon.agents import HistoryItem
from daemon.agents.edits import apply_edits, normalized_hash, validate_candidate
from daemon.agents.offline import OfflineAgent, find_knobs
from daemon.errors import AgentError
from tests.agents.support import BASELINE, make_context


def test_fifty_proposals_are_valid_distinct_and_parse() -> None:
    """50 proposals on the baseline all apply, parse, pass validation and differ from each other."""
    agent = OfflineAgent()
    seen: set[str] = {normalized_hash(BASELINE)}
    for _ in range(50):
        proposal = agent.propose(make_context(seen_hashes=frozenset(seen)))
        assert apply_edits(BASELINE, proposal.edits) == proposal.source
        ast.parse(proposal.source)
        seen.add(validate_candidate(proposal.source, frozenset(seen)))
        assert "\n" not in proposal.description and " -> " in proposal.description
    assert len(seen) == 51


def test_never_repeats_even_before_the_daemon_records_a_hash() -> None:
    """Proposals made while the seen set lags behind (pipelining) are still all different."""
    agent = OfflineAgent()
    sources = {normalized_hash(agent.propose(make_context()).source) for _ in range(10)}
    assert len(sources) == 10


def test_finds_constants_and_preset_entries() -> None:
    """Learning rates, schedule fractions and the presets' depth/width/batch are knobs; other values are not."""
    knobs = {knob.name: knob for knob in find_knobs(BASELINE)}
    assert {"MATRIX_LR", "EMBEDDING_LR", "WARMDOWN_FRACTION", "depth", "model_dim", "device_batch"} <= set(knobs)
    assert "PRINT_EVERY_SECONDS" not in knobs and "seq_len" not in knobs
    assert {site.label for site in knobs["depth"].sites} == {"gpu", "cpu", "tiny"}


def test_kept_direction_is_preferred() -> None:
    """After raising a knob was kept, raising it again is proposed first."""
    history = (HistoryItem(2, "kept", 1.20, -0.05, "raise MATRIX_LR 0.015 -> 0.02"),)
    proposal = OfflineAgent().propose(make_context(history=history))
    assert proposal.description.startswith("raise MATRIX_LR")


def test_steps_widen_after_failures() -> None:
    """After a run of discarded experiments the step grows and the hypothesis says so."""
    history = tuple(HistoryItem(i, "discarded", 1.3, 0.05, f"lower SCALAR_LR {i}") for i in range(2, 6))
    proposal = OfflineAgent().propose(make_context(history=history))
    assert "widened x3" in proposal.hypothesis


def test_source_without_knobs_is_refused() -> None:
    """A train.py without recognisable constants gives a clear AgentError."""
    with pytest.raises(AgentError, match="no hyperparameter constants"):
        OfflineAgent().propose(make_context(best_source="print('hello')\n"))
