"""Class: the candidate tampers with the harness that owns time. The train stage's harness measures the
candidate's phases with its own clock and reports through its exit status; a candidate that could signal
it, read or patch its memory, or replace its report could turn an over-budget run into a scored one.

On the code before the split, the candidate shared the harness's uid: it could open the harness's memory
for writing and signal it. Now the candidate runs as MODEL_UID under a root harness (trainer.privsep), through
StageRunner on the real Docker engine, and every such attempt is refused while the run itself stays honest.
"""

from __future__ import annotations

import json

import pytest

from daemon.research.runner import StageOutcome, StageRunner
from sandbox.spec import MODEL_UID

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TAMPERER = '''
import json, os, signal
from pathlib import Path
import torch
from trainer.layout import announce_training_start
from trainer.prepare import export_checkpoint, read_split_meta

out = Path(os.environ["AUTORESEARCH_OUT_DIR"])
harness = os.getppid()
attempts = {}

def attempt(name, action):
    try:
        action()
        attempts[name] = "succeeded"
    except OSError as exc:
        attempts[name] = "refused: " + type(exc).__name__

announce_training_start()
attempt("patch the harness's memory", lambda: open(f"/proc/{harness}/mem", "r+b", buffering=0).close())
attempt("read the harness's memory", lambda: open(f"/proc/{harness}/mem", "rb", buffering=0).close())
attempt("signal the harness", lambda: os.kill(harness, 0))
attempt("signal the container's deadline keeper", lambda: os.kill(1, 0))
attempt("open the harness's descriptors", lambda: os.listdir(f"/proc/{harness}/fd"))
attempt("become root", lambda: os.setuid(0))
# Squat the report's name with a folder holding a forged report: the harness must write its own anyway.
(out / "train.json").mkdir()
(out / "train.json" / "forged").write_text(json.dumps({"wall_seconds": 0.1, "over_budget": ""}))
vocab = int(read_split_meta(os.environ["AUTORESEARCH_DATA_DIR"])["vocab_size"])
model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))
export_checkpoint(model, out)
os.chmod(out / "model.pt2", 0o600)  # unreadable for the eval stage's scorer (another uid) unless the harness hands it over
print("ATTEMPTS " + json.dumps({"uid": os.getuid(), "attempts": attempts}), flush=True)
'''


@pytest.fixture(scope="module")
def tampered(docker_runner: StageRunner) -> StageOutcome:
    return docker_runner.run(9700, 1, TAMPERER, 3)


def test_candidate_cannot_reach_the_harness_that_times_it(tampered: StageOutcome) -> None:
    """Signals to the harness or the deadline keeper, their memory, their descriptors and root are all refused."""
    line = next(line for line in tampered.train.output_tail.splitlines() if line.startswith("ATTEMPTS "))
    report = json.loads(line[len("ATTEMPTS "):])
    assert report["uid"] == MODEL_UID and len(report["attempts"]) == 6
    assert {name: why for name, why in report["attempts"].items() if not why.startswith("refused")} == {}


def test_squatted_report_is_replaced_by_the_harness(tampered: StageOutcome) -> None:
    """A folder the candidate left at train.json gives way to the harness's own report."""
    train_json = json.loads(tampered.train.files["train.json"])
    assert train_json["exit_code"] == 0 and train_json["checkpoint"] is True and "deadline_seconds" in train_json


def test_split_run_is_scored_with_its_own_model_process(tampered: StageOutcome) -> None:
    """The checkpoint the candidate wrote as MODEL_UID (mode 0600) is scored, by a model process under its own uid."""
    assert tampered.status == "ok", tampered.error
    assert tampered.eval is not None
    assert json.loads(tampered.eval.files["result.json"])["model_process"] == "own uid"
