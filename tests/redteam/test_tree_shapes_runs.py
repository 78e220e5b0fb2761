"""Class 5 through the real stages: a candidate that leaves hostile trees in its out dir, TMPDIR and compile
cache is one `crashed` run with a one-line reason; the harness, the runner and the backends clean up after it
and nothing of the run is left on disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.agents.edits import validate_candidate
from daemon.research.runner import StageRunner
from sandbox import treewalk
from sandbox.docker_backend import DockerBackend
from sandbox.local_backend import LocalBackend
from tests.redteam import hostile_trees
from tests.redteam.redteam_helpers import ENV, EVAL_LIMITS, INSTANCE, REPO_ROOT, TRAIN_LIMITS

HOSTILE = hostile_trees.candidate_source("deep,links,specials,odd_names,locked")
MIXED = hostile_trees.candidate_source("mixed", tmp_shapes="mixed", cache_shapes="mixed")
# Building the trees takes seconds on a loaded machine: a budget they fit in whatever the clock rule, so that the
# outcome is decided by the trees, not by time.
BUDGET = "60"
# The bound a tree passes first depends on the order the walk meets it; each is one line of this form.
OVER_BOUNDS = re.compile(r"train stage out dir holds (folders nested deeper than 32 levels|a path longer than 4096 "
                         r"bytes|more than 100000 entries), over what the daemon walks")


@pytest.fixture(scope="module")
def fast_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where these runs keep their folders: tmpfs where there is one (each run makes and removes some 15,000
    folders, seconds of journal writes apiece on a loaded disk; the code paths are the same on any filesystem)."""
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(prefix="treewalk-runs-", dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) \
        else tmp_path_factory.mktemp("treewalk-runs")
    yield base
    treewalk.remove_tree(base)


@pytest.fixture()
def fast_tmp(fast_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The local backend's TMPDIR folders go to `fast_dir` too."""
    tmp = fast_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _runner(backend: LocalBackend | DockerBackend, image: str, prepared_data: Path, work_dir: Path) -> StageRunner:
    return StageRunner(backend, image=image, trainer_dir=REPO_ROOT / "trainer", data_dir=prepared_data,
                       work_dir=work_dir, instance=INSTANCE, train_limits=TRAIN_LIMITS, eval_limits=EVAL_LIMITS,
                       env={**ENV, "AUTORESEARCH_TIME_BUDGET": BUDGET})


def _leftovers(runner: StageRunner, run: str) -> list[str]:
    """What is left of run `run` (its out dirs, its local TMPDIR) once the runner returned."""
    left = [str(p) for p in (runner.work_dir / run / "train_out", runner.work_dir / run / "eval_out") if p.exists()]
    return left + [p.name for p in Path(tempfile.gettempdir()).glob(f"autoresearch-*-{run}-*-tmp-*")]


def test_hostile_candidates_pass_validation() -> None:
    """The hostile sources are candidates the daemon would run (its validation does not stop them)."""
    validate_candidate(HOSTILE, [])
    validate_candidate(MIXED, [])


@pytest.mark.parametrize(("run_id", "source"), [(9301, HOSTILE), (9302, MIXED)])
def test_local_runner_turns_hostile_trees_into_one_crashed_run(fast_dir: Path, fast_tmp: Path, prepared_data: Path,
                                                                run_id: int, source: str) -> None:
    """Local backend: `crashed` with the bound it passed; out dirs and the run's TMPDIR are gone."""
    local_runner = _runner(LocalBackend(INSTANCE), "", prepared_data, fast_dir / "local")
    outcome = local_runner.run(run_id, 1, source, 0)
    assert outcome.status == "crashed" and outcome.val_bpb is None and OVER_BOUNDS.fullmatch(outcome.error)
    assert _leftovers(local_runner, f"{run_id}-1") == []


def test_harness_cleans_up_a_hostile_compile_cache_and_a_squatted_report(fast_dir: Path,
                                                                         prepared_data: Path) -> None:
    """The trusted harness removes a deep private compile cache and a deep folder squatting train.json, writes
    its report and exits with the candidate's status instead of a traceback."""
    tmp_path = fast_dir / "harness"
    tmp_path.mkdir()
    candidate = tmp_path / "train.py"
    candidate.write_text(hostile_trees.candidate_source("", tmp_shapes="", cache_shapes="mixed", squat_report=True))
    tmpdir, out = tmp_path / "tmp", tmp_path / "out"
    tmpdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(PYTHONPATH=str(REPO_ROOT), TMPDIR=str(tmpdir), AUTORESEARCH_TIME_BUDGET=BUDGET,
               AUTORESEARCH_PRESET="tiny")
    try:
        done = subprocess.run([sys.executable, "-m", "trainer.harness", "train", "--candidate", str(candidate),
                               "--data", str(prepared_data / "train"), "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout[-3000:]
        assert json.loads((out / "train.json").read_text())["exit_code"] == 0
        assert list(tmpdir.glob("compile-cache-*")) == []
    finally:
        assert treewalk.remove_tree(tmp_path)


@pytest.mark.docker
@pytest.mark.slow
def test_docker_runner_turns_hostile_trees_into_one_crashed_run(docker_backend: DockerBackend, trainer_image: str,
                                                                 prepared_data: Path, fast_dir: Path) -> None:
    """Docker backend: the same candidate scores nothing and leaves nothing. Its trees stay in the train stage's
    work tmpfs (the kernel's quota), which dies with the container: only a checkpoint would be copied out."""
    docker_runner = _runner(docker_backend, trainer_image, prepared_data, fast_dir / "docker")
    outcome = docker_runner.run(9303, 1, MIXED, 0)
    assert outcome.status in ("crashed", "invalid") and outcome.val_bpb is None, outcome.log_tail
    assert _leftovers(docker_runner, "9303-1") == []


@pytest.mark.docker
@pytest.mark.slow
def test_purge_container_empties_a_deep_locked_tree(docker_backend: DockerBackend, trainer_image: str,
                                                    fast_dir: Path) -> None:
    """The purge container (what the daemon's user cannot remove) empties a deep, locked, mixed tree."""
    folder = fast_dir / "purge"
    folder.mkdir()
    hostile_trees.mixed(str(folder), 5)
    hostile_trees.deep_chain(str(folder))
    docker_backend.purge(folder, trainer_image)
    assert folder.is_dir() and list(folder.iterdir()) == []
