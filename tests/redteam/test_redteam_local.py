"""The red-team cases that make sense on the local (development) backend."""

from __future__ import annotations

import os

import pytest

from daemon.research.runner import StageRunner
from tests.redteam.test_redteam_docker import NETWORK, SYMLINKS


def test_network_egress_is_blocked_locally(local_runner: StageRunner) -> None:
    """In the local backend's network namespace, TCP, DNS and the gateway are unreachable."""
    if not local_runner.backend.network_isolated:  # type: ignore[attr-defined]
        pytest.skip("this kernel refuses network namespaces: the local backend warned about it")
    outcome = local_runner.run(9101, 1, NETWORK, 0)
    assert outcome.status == "crashed" and "EGRESS" not in outcome.log_tail
    assert "blocked tcp" in outcome.log_tail and "blocked dns" in outcome.log_tail


def test_symlinked_checkpoint_is_refused_locally(local_runner: StageRunner) -> None:
    """A checkpoint symlinked to a host file is never evaluated or read."""
    outcome = local_runner.run(9102, 1, SYMLINKS, 0)
    assert outcome.status == "crashed" and outcome.val_bpb is None
    assert "model.pt2: symlink refused" in outcome.train.error


def test_root_fs_write_is_refused_locally(local_runner: StageRunner) -> None:
    """Without root, the candidate cannot write system paths (as root the local backend cannot stop it)."""
    if os.geteuid() == 0:
        pytest.skip("running as root: the local backend has no mount namespace to protect /usr (use Docker)")
    outcome = local_runner.run(9103, 1, "open('/usr/evil', 'w')\n", 0)
    assert outcome.status == "crashed" and "PermissionError" in outcome.log_tail


def test_fork_bomb_is_contained_locally(local_runner: StageRunner) -> None:
    """Without root, RLIMIT_NPROC stops a fork bomb (root ignores it, so the case is skipped there)."""
    if os.geteuid() == 0:
        pytest.skip("running as root: RLIMIT_NPROC does not bind root (use Docker's pids limit)")
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        raise SystemExit(1)\n"
    outcome = local_runner.run(9104, 1, code, 0)
    assert outcome.status in ("crashed", "timeout") and outcome.val_bpb is None


def test_memory_error_in_the_candidate_is_reported_as_oom_locally(local_runner: StageRunner) -> None:
    """A candidate dying of MemoryError under the address-space limit is `oom`, though the harness prints last."""
    outcome = local_runner.run(9105, 1, "raise MemoryError('simulated allocation failure')\n", 0)
    assert outcome.status == "oom" and outcome.val_bpb is None


def test_checkpoint_made_a_directory_is_a_crash_not_a_daemon_error(local_runner: StageRunner) -> None:
    """A candidate that makes model.pt2 a directory gets `crashed`; the runner cleans up without raising."""
    code = "import os\nos.mkdir(os.path.join(os.environ['AUTORESEARCH_OUT_DIR'], 'model.pt2'))\n"
    outcome = local_runner.run(9106, 1, code, 0)
    assert outcome.status == "crashed" and outcome.val_bpb is None
    assert outcome.error == "train stage left no regular model.pt2 checkpoint"
    assert not (local_runner.work_dir / "9106-1" / "train_out").exists()
