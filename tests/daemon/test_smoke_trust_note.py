"""A passed smoke run's record says its eval checked the code path only, not causality (too few rows)."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.agents import Proposal
from daemon.research.smoke import SMOKE_EVAL_NOTE, SmokeTest, smoke_stage_runner
from daemon.service.runtime import open_runtime

# Honest and quick: the model is built before the training-start line, so the harness's clock sees ~0 s.
QUICK = """
import json, os
import torch
from trainer.layout import announce_training_start
from trainer.prepare import export_checkpoint
vocab = int(json.load(open(os.path.join(os.environ["AUTORESEARCH_DATA_DIR"], "meta.json")))["vocab_size"])
torch.manual_seed(int(os.environ["AUTORESEARCH_SEED"]))
model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
announce_training_start()
export_checkpoint(model, os.environ["AUTORESEARCH_OUT_DIR"])
"""


@pytest.mark.postgres
def test_passed_smoke_run_is_recorded_as_not_a_trust_check(tiny_settings: Any) -> None:
    """The smoke run passes and its stored log tail ends with the not-a-trust-check note."""
    settings = tiny_settings(training={"smoke": True})
    runtime = open_runtime(settings, daemon=False, serve_http=False)
    try:
        smoke = smoke_stage_runner(runtime.runner, settings)
        assert smoke is not None
        session = runtime.store.create_session("smoke-note", "manual", "# program\n", {})
        result = SmokeTest(smoke, runtime.store, 0).run(session.id, Proposal("quick", "h", (), QUICK))
        stored = runtime.store.smoke_runs(session.id)
    finally:
        runtime.close()
    assert result.passed, (result.status, result.error, result.log_tail[-1500:])
    assert [run.status for run in stored] == ["passed"] and stored[0].log_tail.endswith(SMOKE_EVAL_NOTE)
