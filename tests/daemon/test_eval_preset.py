"""The eval stage scores at the shape of the daemon's preset, which the runner hands to both stages."""

from __future__ import annotations

from pathlib import Path

from daemon.research.runner import StageRunner
from sandbox.local_backend import LocalBackend
from tests.redteam.redteam_helpers import ENV, EVAL_LIMITS, REPO_ROOT, TRAIN_LIMITS

# A quick, honest, causal candidate (per-position embedding -> logits) exported at the default scoring shape,
# which follows AUTORESEARCH_PRESET: 2048 tokens for the gpu preset, also on a CPU.
PER_POSITION = """
import json, os
import torch
from trainer.prepare import export_checkpoint
meta = json.load(open(os.path.join(os.environ["AUTORESEARCH_DATA_DIR"], "meta.json")))
vocab = int(meta["vocab_size"])
torch.manual_seed(int(os.environ["AUTORESEARCH_SEED"]))
model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
export_checkpoint(model, os.environ["AUTORESEARCH_OUT_DIR"])
"""


def _runner(preset: str, prepared_data: Path, work_dir: Path) -> StageRunner:
    env = {**ENV, "AUTORESEARCH_PRESET": preset}
    return StageRunner(LocalBackend("evalpreset"), image="", trainer_dir=REPO_ROOT / "trainer",
                       data_dir=prepared_data, work_dir=work_dir, instance="evalpreset",
                       train_limits=TRAIN_LIMITS, eval_limits=EVAL_LIMITS, env=env)


def test_gpu_preset_program_is_scored_at_the_gpu_shape(prepared_data: Path, tmp_path: Path) -> None:
    """A program exported at the gpu preset's length is scored (the eval stage gets the preset too)."""
    outcome = _runner("gpu", prepared_data, tmp_path).run(9701, 1, PER_POSITION, 1)
    assert outcome.status == "ok", (outcome.status, outcome.error)
    assert outcome.val_bpb is not None and outcome.val_bpb > 0


def test_program_at_another_shape_than_the_preset_is_invalid(prepared_data: Path, tmp_path: Path) -> None:
    """A program exported at the gpu length under the cpu preset is refused, not scored."""
    source = PER_POSITION.replace("export_checkpoint(model, os.environ[\"AUTORESEARCH_OUT_DIR\"])",
                                  "export_checkpoint(model, os.environ[\"AUTORESEARCH_OUT_DIR\"], seq_len=2048)")
    outcome = _runner("cpu", prepared_data, tmp_path).run(9702, 1, source, 1)
    assert outcome.status == "invalid" and outcome.val_bpb is None
    assert "scoring shape" in outcome.error
