"""The suite's own Slurm cluster cleans up after itself, even when pytest is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slurm


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): count it as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def test_a_killed_pytest_leaves_no_slurm_daemons_behind() -> None:
    """munged, slurmctld and slurmd of a SIGKILLed owner are killed by the watcher and the temp dir removed."""
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tests.slurmcluster import SlurmCluster; "
              "c = SlurmCluster('killed-owner').start(); "
              "print(' '.join(str(p.pid) for p in c._procs), c.root, flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", script, str(REPO_ROOT)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    *pid_texts, root = owner.stdout.readline().split()
    pids = [int(p) for p in pid_texts]
    assert len(pids) == 3 and all(_alive(pid) for pid in pids)
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (any(_alive(pid) for pid in pids) or Path(root).exists()):
        time.sleep(0.5)
    assert not any(_alive(pid) for pid in pids), "a Slurm daemon outlived its killed owner"
    assert not Path(root).exists()
