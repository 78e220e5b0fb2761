"""The offline agent: real, valid, distinct edits of the real baseline train.py, guided by history."""

from __future__ import annotations

import ast

import pytest

from daemon.agents import HistoryItem
from daemon.agents.edits import apply_edits, normalized_hash, validate_candidate
from daemon.agents.offline import OfflineAgent, find_knobs
from daemon.errors import AgentFatal
from tests.agents.support import BASELINE, make_context

# One knob (LR) in an otherwise valid train.py: its neighbourhood is exhausted after a few proposals.
TINY_SOURCE = ('import os\nLR = 0.5\nBUDGET = float(os.environ.get("AUTORESEARCH_TIME_BUDGET", 300))\n'
               'from trainer.prepare import export_checkpoint\nexport_checkpoint(None, ".")\n')


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


def test_bookkeeping_runs_after_a_keep_do_not_widen_the_step() -> None:
    """Re-measures, confirmations and noise runs (`measured`) after a keep are no failures: the step stays 1."""
    history = (HistoryItem(2, "kept", 1.20, -0.05, "raise MATRIX_LR 0.015 -> 0.02"),
               *(HistoryItem(i, "measured", 1.21, 0.0, f"re-measure the best #2 (seed {i})") for i in range(3, 7)))
    proposal = OfflineAgent().propose(make_context(history=history))
    assert "widened" not in proposal.hypothesis


def test_only_judged_failures_widen_the_step() -> None:
    """Between bookkeeping runs, one discard and one crash since the keep widen the step to x2."""
    history = (HistoryItem(2, "kept", 1.20, -0.05, "raise MATRIX_LR 0.015 -> 0.02"),
               HistoryItem(3, "measured", 1.21, 0.0, "re-measure"),
               HistoryItem(4, "discarded", 1.3, 0.05, "lower SCALAR_LR 0.5 -> 0.4"),
               HistoryItem(5, "measured", 1.29, 0.04, "confirm #4"),
               HistoryItem(6, "crashed", None, None, "raise EMBEDDING_LR 0.6 -> 0.8"))
    proposal = OfflineAgent().propose(make_context(history=history))
    assert "widened x2" in proposal.hypothesis


def test_source_without_knobs_is_refused() -> None:
    """A train.py without recognisable constants is a fatal agent error (no retry can help)."""
    with pytest.raises(AgentFatal, match="no hyperparameter constants"):
        OfflineAgent().propose(make_context(best_source="print('hello')\n"))


def test_a_new_session_may_retry_last_sessions_ideas() -> None:
    """The memory of proposals is per session: after exhausting one night, the next night proposes again."""
    agent = OfflineAgent()
    first_night: list[str] = []
    with pytest.raises(AgentFatal):
        for _ in range(10_000):
            first_night.append(agent.propose(make_context(session_id=1, best_source=TINY_SOURCE)).source)
    assert agent.propose(make_context(session_id=2, best_source=TINY_SOURCE)).source in first_night


def test_exhausted_search_is_fatal() -> None:
    """After its valid proposals run out near the best, the agent says so as a fatal error."""
    agent = OfflineAgent()
    seen: set[str] = set()
    with pytest.raises(AgentFatal, match="no untried configuration"):
        for _ in range(10_000):
            proposal = agent.propose(make_context(best_source=TINY_SOURCE, seen_hashes=frozenset(seen)))
            seen.add(validate_candidate(proposal.source, frozenset(seen)))
    assert len(seen) >= 2


def test_preset_knobs_learn_from_results() -> None:
    """A kept change of a lower-case preset entry (depth) is recognised and its direction tried again first."""
    first = OfflineAgent().propose(make_context(history=()))
    assert first.description  # any move; now pretend raising depth was kept
    history = (HistoryItem(2, "kept", 1.20, -0.05, "raise depth 8 -> 9 (gpu), 4 -> 5 (cpu), 2 -> 3 (tiny)"),)
    proposal = OfflineAgent().propose(make_context(history=history))
    assert proposal.description.startswith("raise depth")


def test_a_direction_that_hurt_is_not_tried_first() -> None:
    """After lowering a preset's width was discarded as worse, lowering it is not the next proposal."""
    history = tuple(HistoryItem(i, "discarded", 1.4, 0.1, "lower model_dim 512 -> 448 (gpu)") for i in range(2, 4))
    proposal = OfflineAgent().propose(make_context(history=history))
    assert not proposal.description.startswith("lower model_dim")
