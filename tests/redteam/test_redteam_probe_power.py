"""Issue 21 class 8 and issue 20 item 6 through StageRunner (local backend, real harness, real probe).

- A checkpoint that peeks at the next token at ~1% of positions, scored on a small eval (~40 rows): the probe
  catches it only with probability ~0.26 there, so on the old code it came back `ok` about 3 times in 4. With
  the floor the daemon sets, the eval stage refuses to score it: never `ok`, never a val_bpb.
- A GPU lane whose stage sees no CUDA device ends `infra_error` with the reason, never a CPU run; a candidate
  that exits with the harness's refusal code itself is still `crashed` (it cannot buy a retry).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.research.runner import StageRunner
from sandbox.base import Backend
from sandbox.docker_backend import DockerBackend
from sandbox.local_backend import LocalBackend
from tests.redteam.redteam_helpers import ENV, EVAL_LIMITS, REPO_ROOT, TRAIN_LIMITS
from trainer import device_check
from trainer.probe_power import FLOOR_ENV, detection_probability

# ~1% of positions peek at the next token: 10 of the 1024 positions of the CPU scoring shape.
SPARSE_PEEK = """
import json, os
import torch
from trainer.layout import announce_training_start
from trainer.prepare import export_checkpoint
vocab = int(json.load(open(os.path.join(os.environ["AUTORESEARCH_DATA_DIR"], "meta.json")))["vocab_size"])
torch.manual_seed(int(os.environ["AUTORESEARCH_SEED"]))
announce_training_start()

class SparsePeek(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.e = torch.nn.Embedding(vocab, 16)
        self.h = torch.nn.Linear(16, vocab)
    def forward(self, idx):
        hidden = self.e(idx)
        peek = (torch.arange(idx.shape[1]) % 100 == 37).float()
        return self.h(hidden + peek[None, :, None] * torch.roll(hidden, -1, dims=1))
export_checkpoint(SparsePeek(), os.environ["AUTORESEARCH_OUT_DIR"])
"""
CLAIMS_NO_CUDA = f"raise SystemExit({device_check.EXIT_NO_CUDA})\n"


def _runner(prepared_data: Path, work_dir: Path, backend: Backend | None = None, image: str = "",
            **env: str) -> StageRunner:
    return StageRunner(backend or LocalBackend("probepower"), image=image, trainer_dir=REPO_ROOT / "trainer",
                       data_dir=prepared_data, work_dir=work_dir, instance="probepower",
                       train_limits=TRAIN_LIMITS, eval_limits=EVAL_LIMITS,
                       env={**ENV, "AUTORESEARCH_EVAL_TOKENS": str(40 * 1024), **env})


def test_a_sparse_peek_at_a_small_eval_is_never_scored(prepared_data: Path, tmp_path: Path) -> None:
    """With the daemon's floor, an eval too small to catch a 1% peek is refused (infra_error), not scored ok."""
    assert detection_probability(40, 10 / 1024) < 0.5  # the old code scored it as honest more often than not
    outcome = _runner(prepared_data, tmp_path, **{FLOOR_ENV: "1"}).run(9801, 1, SPARSE_PEEK, 1)
    assert outcome.status == "infra_error" and outcome.val_bpb is None, (outcome.status, outcome.error)
    assert "refusing to score" in outcome.error and "probe power" in outcome.error


def test_a_gpu_lane_without_cuda_is_an_infra_error(prepared_data: Path, tmp_path: Path) -> None:
    """A run on a GPU lane on this CPU-only machine stops at the harness's check with the reason."""
    if device_check.cuda_problem(device_check.torch_cuda_version(), device_check.load_libcuda()) is None:
        pytest.skip("this machine has a working CUDA device")
    outcome = _runner(prepared_data, tmp_path).run(9802, 1, SPARSE_PEEK, 1, gpu_uuid="GPU-fake-lane")
    assert outcome.status == "infra_error" and outcome.eval is None, (outcome.status, outcome.error)
    assert "no CUDA device on a GPU lane" in outcome.error


def test_a_candidate_exiting_with_the_refusal_code_is_crashed(prepared_data: Path, tmp_path: Path) -> None:
    """The candidate's own exit 17 is not the harness's refusal: the run is `crashed`."""
    outcome = _runner(prepared_data, tmp_path).run(9803, 1, CLAIMS_NO_CUDA, 1)
    assert outcome.status == "crashed", (outcome.status, outcome.error)


@pytest.mark.docker
@pytest.mark.slow
def test_a_sparse_peek_at_a_small_eval_is_never_scored_in_docker(trainer_image: str, prepared_data: Path,
                                                                 tmp_path: Path) -> None:
    """The same through the hardened Docker stages (split uids, read-only root): refused, never `ok`."""
    backend = DockerBackend("probepower")
    try:
        outcome = _runner(prepared_data, tmp_path, backend, trainer_image, **{FLOOR_ENV: "1"}).run(
            9804, 1, SPARSE_PEEK, 1)
    finally:
        backend.close()
    assert outcome.status == "infra_error" and outcome.val_bpb is None, (outcome.status, outcome.error)
    assert "refusing to score" in outcome.error
