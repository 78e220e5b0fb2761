"""The CUDA trainer image, built here without a registry (cached by input hash: a rebuild is a no-op).

No GPU here: these check what a CPU machine can check inside that image — a CUDA build of torch, a working
torch.compile (the C compiler), and a baseline trained and scored through the real sandbox and eval stage.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import docker
import pytest

from daemon.research.runner import StageRunner
from sandbox import images
from sandbox.docker_backend import DockerBackend
from sandbox.spec import Limits
from tests.conftest import _docker_reason

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTANCE = "cudaimage"
LIMITS = Limits(timeout_s=300, memory_bytes=3 * 1024**3, cpus=1.0, pids=1024, shm_bytes=64 * 1024**2,
                tmpfs_bytes=512 * 1024**2, output_tail_bytes=16384)
HARDENED = dict(network_mode="none", read_only=True, user="1000:1000", cap_drop=["ALL"],
                security_opt=["no-new-privileges"], tmpfs={"/tmp": "rw,exec,size=512m"}, mem_limit="3g")

COMPILE_CHECK = """
import torch
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
x = torch.randn(8, 16)
compiled = torch.compile(model)
assert torch.allclose(compiled(x), model(x), atol=1e-5)
print("compiled ok", torch.version.cuda)
"""


@pytest.fixture(scope="session")
def cuda_image() -> str:
    """The CUDA image of the current recipe: built once per input hash (minutes and ~3 GB of wheels the first time)."""
    if (reason := _docker_reason()) is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    return images.ensure_image(images.plan_image("cuda"))


def _run(image: str, *command: str) -> str:
    client = docker.from_env()
    try:
        return client.containers.run(image, list(command), remove=True, **HARDENED).decode()
    finally:
        client.close()


def test_cuda_image_is_cached_by_its_inputs(cuda_image: str) -> None:
    """A second ensure with unchanged inputs builds nothing and returns the same tag."""
    lines: list[str] = []
    assert images.ensure_image(images.plan_image("cuda"), progress=lines.append) == cuda_image
    assert lines == []


def test_cuda_image_labels_name_torch_and_cuda(cuda_image: str) -> None:
    """The labels that `doctor` prints: torch version, CUDA version, variant, base and the input hash."""
    client = docker.from_env()
    try:
        labels = images.image_labels(client, cuda_image)
    finally:
        client.close()
    assert labels == {"torch": images.TORCH_VERSION, "torch_cuda": "13.0", "variant": "cuda",
                      "base": "debootstrap", "inputs": images.plan_image("cuda").inputs}


def test_torch_in_the_image_is_a_cuda_build(cuda_image: str) -> None:
    """torch reports its CUDA version (the runtime wheels are inside), whatever PYTHONPATH a run sets."""
    out = _run(cuda_image, "env", "PYTHONPATH=/opt/autoresearch", "python3", "-c",
               "import torch, tiktoken, numpy, tokenizers; print(torch.__version__, torch.version.cuda)")
    assert out.split() == [f"{images.TORCH_VERSION}+cu130", "13.0"]


def test_torch_compile_works_in_the_image(cuda_image: str) -> None:
    """Inductor compiles a small model on CPU inside the hardened container (the image has gcc/g++)."""
    out = _run(cuda_image, "python3", "-c", COMPILE_CHECK)
    assert "compiled ok 13.0" in out


def test_baseline_trained_in_the_cuda_image_passes_the_eval(cuda_image: str, baseline_source: str,
                                                           prepared_data: Path, tmp_path: Path) -> None:
    """The baseline's export from this image's torch is accepted by the eval stage's checks and scored."""
    backend = DockerBackend(INSTANCE)
    try:
        runner = StageRunner(backend, image=cuda_image, trainer_dir=REPO_ROOT / "trainer", data_dir=prepared_data,
                             work_dir=tmp_path, instance=INSTANCE, train_limits=LIMITS, eval_limits=LIMITS,
                             env={"AUTORESEARCH_TIME_BUDGET": "3", "AUTORESEARCH_PRESET": "tiny",
                                  "AUTORESEARCH_EVAL_TOKENS": "8192"})
        outcome = runner.run(1, 1, baseline_source, seed=0)
    finally:
        backend.close()
    assert outcome.status == "ok", outcome.error + outcome.log_tail[-2000:]
    assert outcome.probe == "passed" and outcome.val_bpb is not None and math.isfinite(outcome.val_bpb)
