"""Compile-cache isolation on the real Docker engine: candidates read a copy, only the warm-up run publishes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.research.runner import StageRunner
from sandbox.docker_backend import DockerBackend
from sandbox.spec import Limits

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTANCE = "cachetest"
LIMITS = Limits(timeout_s=120, memory_bytes=1024 * 1024**2, cpus=1.0, pids=256, shm_bytes=64 * 1024**2,
                tmpfs_bytes=128 * 1024**2, output_tail_bytes=8192)

# A candidate that tries every way to leave something behind in the lane's compile cache.
ATTACKER = '''
import os, pathlib
shared = "/cache"
private = pathlib.Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
try:
    pathlib.Path(shared, "evil.py").write_text("import os  # would run in the next candidate")
    print("WROTE-SHARED")
except OSError as exc:
    print("shared cache refused:", exc.strerror)
seen = sorted(p.name for p in private.rglob("*") if p.is_file())
print("SEEN", ",".join(seen))
(private / "poison.py").write_text("poisoned = True")
pathlib.Path(os.environ["AUTORESEARCH_OUT_DIR"], "model.pt2").write_bytes(b"not a checkpoint")
'''

# The shipped baseline of these tests: compiles (here: writes one entry) into its private cache, exits cleanly.
WARMUP = '''
import os, pathlib
private = pathlib.Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
(private / "warm.py").write_text("compiled = True")
pathlib.Path(os.environ["AUTORESEARCH_OUT_DIR"], "model.pt2").write_bytes(b"not a checkpoint")
'''


@pytest.fixture()
def runner(trainer_image: str, prepared_data: Path, tmp_path: Path) -> Iterator[StageRunner]:
    """A runner whose shipped baseline (the one source allowed to fill the cache) is WARMUP."""
    trainer_dir = tmp_path / "trainer"
    shutil.copytree(REPO_ROOT / "trainer", trainer_dir, ignore=shutil.ignore_patterns("__pycache__"))
    (trainer_dir / "train.py").write_text(WARMUP)
    backend = DockerBackend(INSTANCE)
    yield StageRunner(backend, image=trainer_image, trainer_dir=trainer_dir, data_dir=prepared_data,
                      work_dir=tmp_path / "work", instance=INSTANCE, train_limits=LIMITS, eval_limits=LIMITS,
                      env={"AUTORESEARCH_EVAL_TOKENS": "4096"}, compile_cache=tmp_path / "lane-cache")
    backend.close()


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.docker
def test_candidate_cannot_write_the_shared_cache(runner: StageRunner) -> None:
    """The shared cache is mounted read-only: a candidate's write fails and nothing appears on the host."""
    outcome = runner.run(1, 1, ATTACKER, seed=0)
    assert "shared cache refused: Read-only file system" in outcome.train.output_tail
    assert "WROTE-SHARED" not in outcome.train.output_tail
    assert runner.compile_cache is not None and _files(runner.compile_cache) == set()


@pytest.mark.docker
def test_poisoned_entry_never_reaches_the_next_run(runner: StageRunner) -> None:
    """Only the shipped baseline publishes; a candidate's poisoned private entry is gone for the next
    candidate, which still starts from the baseline's entries."""
    runner.run(1, 1, WARMUP, seed=0)
    assert runner.compile_cache is not None
    assert _files(runner.compile_cache) == {"inductor/warm.py"}
    first = runner.run(2, 1, ATTACKER, seed=0)
    assert "SEEN warm.py" in first.train.output_tail
    second = runner.run(3, 1, ATTACKER, seed=0)
    assert "SEEN warm.py\n" in second.train.output_tail + "\n"
    assert "poison" not in second.train.output_tail.split("SEEN", 1)[1].splitlines()[0]
    assert _files(runner.compile_cache) == {"inductor/warm.py"}


@pytest.mark.docker
def test_a_candidate_run_publishes_nothing(runner: StageRunner) -> None:
    """A candidate (any source but the shipped baseline) that leaves a published-looking folder in its out
    dir adds nothing to the shared cache."""
    sneaky = WARMUP + (
        'pathlib.Path(os.environ["AUTORESEARCH_OUT_DIR"], "compile-cache", "inductor").mkdir(parents=True)\n'
        'pathlib.Path(os.environ["AUTORESEARCH_OUT_DIR"], "compile-cache", "inductor", "evil.py").write_text("x")\n')
    runner.run(1, 1, sneaky, seed=0)
    assert runner.compile_cache is not None and _files(runner.compile_cache) == set()
