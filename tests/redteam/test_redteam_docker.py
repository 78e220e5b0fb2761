"""Hostile candidates through StageRunner on the real Docker engine.

All cases run once, concurrently, in a session fixture; each test checks one case's outcome: the
right status, no val_bpb (or the honest one), the host and mounts untouched, no container left.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from daemon.research.runner import StageOutcome, StageRunner
from tests.redteam.redteam_helpers import REPO_ROOT, our_containers, tree_digest

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FAIL = "raise SystemExit(1)\n"
NETWORK = """
import socket
def attempt(what, fn):
    try:
        fn(); print("EGRESS", what)
    except OSError as e:
        print("blocked", what, type(e).__name__)
attempt("tcp", lambda: socket.create_connection(("1.1.1.1", 443), timeout=3))
attempt("dns", lambda: socket.getaddrinfo("deb.debian.org", 80))
attempt("gateway", lambda: socket.create_connection(("172.17.0.1", 2375), timeout=3))
""" + FAIL
WRITES = """
import os
for path in ("/usr/lib/evil", "/etc/evil", "/data/evil", "/data/tokens.bin", "/candidate/evil",
             "/opt/autoresearch/trainer/harness.py", "/home/evil", "/evil"):
    try:
        with open(path, "a") as f:
            f.write("x"); print("WROTE", path)
    except OSError as e:
        print("denied", path, e.errno)
""" + FAIL
SYMLINKS = """
import os
out = os.environ["AUTORESEARCH_OUT_DIR"]
os.symlink("/etc/passwd", os.path.join(out, "model.pt2"))
os.symlink("/etc/shadow", os.path.join(out, "train.json"))
"""
READ_VAL = """
import os
candidates = ["/data/../val/tokens.bin", "/val/tokens.bin", "/checkpoint/tokens.bin", "HOST_VAL"]
print("val files visible:", [p for p in candidates if os.path.exists(p)])
print("data holds:", sorted(os.listdir("/data")))
""" + FAIL
BACKGROUND = """
import os, subprocess, sys
out = os.environ["AUTORESEARCH_OUT_DIR"]
subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(600); open('{out}/late.txt', 'w').write('x')",
                  "redteam-background-marker"],
                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("main exits")
"""
FAKE_SUMMARY_TAIL = """
print("---")
print("val_bpb:          0.100000")
print("training_seconds: 1.0")
"""

CASES: dict[str, tuple[str, str]] = {
    # name: (runner, source); runner "short" has an 8 s wall-clock limit and 512 MB of memory
    "fork_bomb": ("short", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"),
    "memory_bomb": ("short", "chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 1024**2))\n"),
    "infinite_loop": ("short", "while True:\n    pass\n"),
    "sleep_past_budget": ("short", "import time\ntime.sleep(3600)\n"),
    "background_process": ("full", BACKGROUND),
    "network": ("full", NETWORK),
    "writes": ("full", WRITES),
    "symlinks": ("full", SYMLINKS),
    "stdout_flood": ("full", "import sys\nchunk = 'A' * 1023 + '\\n'\nfor _ in range(50 * 1024):\n    sys.stdout.write(chunk)\n" + FAIL),
    "read_val": ("full", READ_VAL),
    "syntax_error": ("full", "def broken(:\n    pass\n"),
    "missing_module": ("full", "import definitely_not_installed_module\n"),
}


@pytest.fixture(scope="session")
def host_state(prepared_data: Path) -> dict[str, str]:
    return {"data": tree_digest(prepared_data), "trainer": tree_digest(REPO_ROOT / "trainer")}


@pytest.fixture(scope="session")
def outcomes(docker_runner: StageRunner, short_docker_runner: StageRunner, baseline_source: str,
             prepared_data: Path, host_state: dict[str, str]) -> dict[str, StageOutcome]:
    host_val = str(prepared_data / "val" / "tokens.bin")
    sources = {name: (runner, source.replace("HOST_VAL", host_val)) for name, (runner, source) in CASES.items()}
    sources["fake_summary"] = ("full", baseline_source + FAKE_SUMMARY_TAIL)
    sources["nan_loss"] = ("full", baseline_source.replace("loss_value = loss.item()",
                                                            "loss_value = loss.item() * float('nan')"))
    runners = {"full": docker_runner, "short": short_docker_runner}
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {
            name: pool.submit(runners[kind].run, 9000 + i, 1, source, 0)
            for i, (name, (kind, source)) in enumerate(sorted(sources.items()))
        }
        return {name: future.result() for name, future in futures.items()}


def _no_improvement(outcome: StageOutcome) -> None:
    assert outcome.val_bpb is None, outcome


def test_fork_bomb_is_contained(outcomes: dict[str, StageOutcome]) -> None:
    """A fork bomb hits the pids limit and is killed at the wall-clock limit."""
    assert outcomes["fork_bomb"].status in ("timeout", "crashed")
    _no_improvement(outcomes["fork_bomb"])


def test_memory_bomb_is_oom(outcomes: dict[str, StageOutcome]) -> None:
    """Allocating without bound ends as oom."""
    assert outcomes["memory_bomb"].status == "oom"
    _no_improvement(outcomes["memory_bomb"])


def test_infinite_loop_times_out(outcomes: dict[str, StageOutcome]) -> None:
    """A busy loop is killed from outside at the limit."""
    assert outcomes["infinite_loop"].status == "timeout"
    _no_improvement(outcomes["infinite_loop"])


def test_sleep_past_budget_times_out(outcomes: dict[str, StageOutcome]) -> None:
    """Sleeping past the budget is killed from outside at the limit."""
    assert outcomes["sleep_past_budget"].status == "timeout"


def test_background_process_does_not_outlive_the_run(outcomes: dict[str, StageOutcome]) -> None:
    """A detached child (sleeping 10 minutes) dies with the container: no such process is left on the host."""
    outcome = outcomes["background_process"]
    assert outcome.status == "crashed" and "late.txt" not in outcome.train.files
    survivors = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"redteam-background-marker" in (entry / "cmdline").read_bytes():
                survivors.append(int(entry.name))
        except OSError:  # exited while we looked
            continue
    assert survivors == []
    _no_improvement(outcome)


def test_network_egress_is_blocked(outcomes: dict[str, StageOutcome]) -> None:
    """TCP out, DNS and the bridge gateway are all unreachable."""
    tail = outcomes["network"].log_tail
    assert "EGRESS" not in tail
    assert "blocked tcp" in tail and "blocked dns" in tail and "blocked gateway" in tail


def test_writes_outside_out_dir_are_denied(outcomes: dict[str, StageOutcome], prepared_data: Path,
                                           host_state: dict[str, str]) -> None:
    """Root fs, data, candidate and trainer mounts refuse writes; the host copies are unchanged."""
    tail = outcomes["writes"].log_tail
    assert "WROTE" not in tail and tail.count("denied") == 8
    assert tree_digest(prepared_data) == host_state["data"]
    assert tree_digest(REPO_ROOT / "trainer") == host_state["trainer"]


def test_symlinks_to_host_files_are_not_followed(outcomes: dict[str, StageOutcome]) -> None:
    """Symlinked out files stay in the candidate's work tmpfs: the harness copies only a regular checkpoint out, so no
    link and no host file content comes back, and the run is crashed."""
    outcome = outcomes["symlinks"]
    assert outcome.status == "crashed" and "left no regular model.pt2" in outcome.log_tail, outcome.log_tail[-500:]
    assert "model.pt2" not in outcome.train.files and "symlink" not in outcome.train.error
    assert not any(b"root:" in content for content in outcome.train.files.values())
    _no_improvement(outcome)


def test_stdout_flood_is_capped(outcomes: dict[str, StageOutcome]) -> None:
    """50 MB of output yields a tail within the cap and a normal crash classification."""
    outcome = outcomes["stdout_flood"]
    assert outcome.status == "crashed" and len(outcome.train.output_tail.encode()) <= 8192


def test_validation_split_is_invisible_during_training(outcomes: dict[str, StageOutcome]) -> None:
    """The train stage sees the train split only."""
    tail = outcomes["read_val"].log_tail
    assert "val files visible: []" in tail and "tokens.bin" in tail


def test_syntax_error_is_crashed(outcomes: dict[str, StageOutcome]) -> None:
    """A candidate that does not parse is a crash with its traceback in the tail."""
    assert outcomes["syntax_error"].status == "crashed" and "SyntaxError" in outcomes["syntax_error"].log_tail


def test_missing_module_is_crashed(outcomes: dict[str, StageOutcome]) -> None:
    """Importing a module the image lacks is a crash."""
    outcome = outcomes["missing_module"]
    assert outcome.status == "crashed" and "ModuleNotFoundError" in outcome.log_tail


def test_fake_summary_does_not_set_val_bpb(outcomes: dict[str, StageOutcome]) -> None:
    """A printed val_bpb of 0.1 is ignored: the metric is the eval stage's honest number."""
    outcome = outcomes["fake_summary"]
    assert outcome.status == "ok" and outcome.probe == "passed"
    assert outcome.val_bpb is not None and outcome.val_bpb > 1.0


def test_nan_loss_fails_fast(outcomes: dict[str, StageOutcome]) -> None:
    """A NaN loss stops training early and is reported as crashed."""
    outcome = outcomes["nan_loss"]
    assert outcome.status == "crashed" and "nan" in outcome.log_tail.lower()
    _no_improvement(outcome)


def test_no_container_is_left_behind(outcomes: dict[str, StageOutcome]) -> None:
    """Every red-team container was removed."""
    assert len(outcomes) == len(CASES) + 2
    assert our_containers() == []
