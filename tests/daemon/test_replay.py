"""ReplayGuard: a bit-identical result of the same source under another seed is a replay."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from daemon.research.replay import MAX_RUNS_PER_SOURCE, ReplayGuard
from daemon.research.smoke import smoke_stage_runner
from daemon.service.runtime import open_runtime
from daemon.store.scored_runs import ScoredRunRow

# A quick program that ignores AUTORESEARCH_SEED: every run exports the same per-position model.
SEED_BLIND = """
import json, os
import torch
from trainer.prepare import export_checkpoint
meta = json.load(open(os.path.join(os.environ["AUTORESEARCH_DATA_DIR"], "meta.json")))
vocab = int(meta["vocab_size"])
torch.manual_seed(1234)
model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
export_checkpoint(model, os.environ["AUTORESEARCH_OUT_DIR"])
"""


def test_same_checkpoint_under_another_seed_is_a_replay() -> None:
    """A byte-identical checkpoint from seed 2 after seed 1 is refused, naming the seed variable."""
    guard = ReplayGuard()
    assert guard.check("code", 1, "abc", 2.5) == ""
    assert "AUTORESEARCH_SEED" in guard.check("code", 2, "abc", 2.4)


def test_same_val_bpb_under_another_seed_is_a_replay() -> None:
    """An exactly equal val_bpb (different archive bytes) is refused too."""
    guard = ReplayGuard()
    guard.check("code", 1, "abc", 2.5)
    assert "bit-identical" in guard.check("code", 2, "def", 2.5)


def test_same_seed_and_other_sources_are_not_replays() -> None:
    """A retry under the same seed, and another source with the same numbers, pass."""
    guard = ReplayGuard()
    guard.check("code", 1, "abc", 2.5)
    assert guard.check("code", 1, "abc", 2.5) == ""
    assert guard.check("other code", 2, "abc", 2.5) == ""


def test_honest_reruns_pass_and_memory_is_bounded() -> None:
    """Different results under different seeds pass; only the last runs per source are kept."""
    guard = ReplayGuard()
    for seed in range(MAX_RUNS_PER_SOURCE + 10):
        assert guard.check("code", seed, f"sha{seed}", 2.0 + seed / 1000) == ""
    assert guard.check("code", 999, "sha0", 9.0) == ""  # the oldest run was forgotten


@pytest.mark.postgres
def test_daemon_refuses_a_replay_after_a_restart(tiny_settings: Any) -> None:
    """A seed-blind source scored before a daemon restart is refused under another seed after it (store memory)."""
    settings = tiny_settings()
    runtime = open_runtime(settings, daemon=False, serve_http=False)
    try:
        session = runtime.store.create_session("night-1", "manual", "# program\n", {})
        first = runtime.store.create_experiment(session.id, "baseline", SEED_BLIND, seed=0)
        second = runtime.store.create_experiment(session.id, "noise", SEED_BLIND, seed=1)
        scored = runtime.runner.run(first.id, 1, SEED_BLIND, 0)
    finally:
        runtime.close()
    assert scored.status == "ok", (scored.status, scored.error)
    runtime = open_runtime(settings, daemon=False, serve_http=False)
    try:
        replayed = runtime.runner.run(second.id, 1, SEED_BLIND, 1)
    finally:
        runtime.close()
    assert replayed.status == "invalid" and replayed.val_bpb is None, (replayed.status, replayed.error)
    assert f"seed 0 (experiment #{first.id})" in replayed.error and "AUTORESEARCH_SEED" in replayed.error


@pytest.mark.postgres
def test_smoke_runs_stay_out_of_the_store(tiny_settings: Any) -> None:
    """A smoke run (not a scored run, no experiment) is checked in process and never recorded in scored_runs."""
    settings = tiny_settings(training={"smoke": True})
    runtime = open_runtime(settings, daemon=False, serve_http=False)
    try:
        smoke = smoke_stage_runner(runtime.runner, settings)
        assert smoke is not None
        outcome = smoke.run(1, 1, SEED_BLIND, 0)
        with runtime.store.engine.connect() as conn:
            recorded = conn.scalar(select(func.count()).select_from(ScoredRunRow))
    finally:
        runtime.close()
    assert outcome.status == "ok", (outcome.status, outcome.error)
    assert recorded == 0
