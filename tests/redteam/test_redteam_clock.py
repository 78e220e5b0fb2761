"""Buying time or disk around the harness, one hostile candidate per class, through StageRunner on real Docker.

Issue #21, classes 1-4 and 7. Before it, the harness split a run at marker lines the candidate prints (start-up,
training, export, each with its own allowance, plus 5% + 3 s of tolerance), killed only the candidate's session at
its exit, and measured the out dir's quota by walking the tree: each candidate here came back `ok` (or held host
disk beyond the quota). Now one clock runs from the spawn to compile allowance + budget + 2% (trainer.clock),
every process of the candidate's uid dies before the checkpoint is copied out (trainer.privsep.kill_uid), and the
candidate writes a tmpfs whose size is its quota. Each candidate measures its own time with its own clock
from its start, which is no earlier than the harness's spawn: it overruns the harness's deadline at least as much.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from daemon.research.runner import StageOutcome, StageRunner
from sandbox.docker_backend import DockerBackend
from tests.redteam.redteam_helpers import EVAL_LIMITS, INSTANCE, REPO_ROOT, TRAIN_LIMITS, our_containers
from trainer.clock import SLACK_FRACTION, SLACK_MIN_SECONDS

pytestmark = [pytest.mark.docker, pytest.mark.slow]

BUDGET, COMPILE = 10.0, 20.0          # the stage's hard deadline: 20 + 10 + max(1, 2% of 10) = 31 s after the spawn
QUOTA = 48 * 1024**2                  # the candidate's work dir (its tmpfs) holds this much
# Candidates that overrun the deadline by construction run on the tight clock; those whose point is not time
# (and the honest baseline, on a loaded machine) get a roomy compile allowance: the same rules, more seconds.
ROOMY_COMPILE = 400.0
CLOCK_ENV = {"AUTORESEARCH_TIME_BUDGET": f"{BUDGET:g}", "AUTORESEARCH_COMPILE_BUDGET": f"{COMPILE:g}",
             "AUTORESEARCH_PRESET": "tiny", "AUTORESEARCH_EVAL_TOKENS": "8192", "AUTORESEARCH_OUT_QUOTA": str(QUOTA)}
ROOMY_ENV = {**CLOCK_ENV, "AUTORESEARCH_COMPILE_BUDGET": f"{ROOMY_COMPILE:g}"}
ROOMY_LIMITS = replace(TRAIN_LIMITS, timeout_s=ROOMY_COMPILE + BUDGET + 120)

HEADER = f'''
import hashlib, os, sys, time
from pathlib import Path
BORN = time.monotonic()
import torch  # start-up: under the old rules, before the start line, in the start-up allowance
from trainer.layout import announce_training_start
BUDGET, COMPILE = {BUDGET}, {COMPILE}
out = Path(os.environ["AUTORESEARCH_OUT_DIR"])

def compute_until(t):  # "training": the CPU busy until `t` seconds after this script's start
    x = 0
    while time.monotonic() - BORN < t:
        x = (x * 31 + 7) % 1000003
    return x

def export(seed, folder=out):  # prints the export line first
    from trainer.prepare import export_checkpoint, read_split_meta
    torch.manual_seed(seed)
    vocab = int(read_split_meta(os.environ["AUTORESEARCH_DATA_DIR"])["vocab_size"])
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))
    folder.mkdir(exist_ok=True)
    return export_checkpoint(model, folder)
'''

# Class 1: trains through the start-up allowance (the old one: compile budget + 30 s), then announces the start
# and trains the full budget.
BEFORE_START_LINE = HEADER + '''
compute_until(COMPILE + BUDGET / 2)
announce_training_start()
compute_until(COMPILE + 1.5 * BUDGET)
export(0)
'''
# Class 2: announces the export early, then keeps training with its output swallowed (no later export line is
# seen) inside the old 60 s export allowance, and exports the longer-trained model.
IN_EXPORT_WINDOW = HEADER + '''
announce_training_start()
compute_until(0.9 * BUDGET)
export(0)
sys.stdout.flush()
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
compute_until(0.9 * BUDGET + 30)
export(1)
'''
# Class 3: the watched process plants folders that slow the harness's clean-up (in start-up), exports and exits; a
# double-forked process in a session of its own, silent, waits for the exit, trains on and swaps in its checkpoint.
AFTER_THE_EXIT = HEADER + '''
for i in range(100000):  # in the private compile cache, which the harness removes after the exit
    os.makedirs(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], f"d{i // 1000}", str(i)), exist_ok=True)
announce_training_start()
path = export(0)
print("EXPORTED", hashlib.sha256(path.read_bytes()).hexdigest(), flush=True)
parent, (ready_r, ready_w) = os.getpid(), os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.write(ready_w, b"1")
        while os.path.exists(f"/proc/{parent}"):
            time.sleep(0.01)
        compute_until(time.monotonic() - BORN + 2)  # training after the exit
        os.replace(export(1, out / "later"), out / "model.pt2")
        compute_until(600)
    os._exit(0)
os.read(ready_r, 1)
'''
# Class 4: disk in files unlinked while held open, the quota walk cannot see them. One candidate writes through
# a detached process that outlives the exit, another reserves the space with fallocate in the watched process.
UNLINKED_DETACHED = HEADER + '''
announce_training_start()
export(0)
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()
    held, chunk = 0, b"\\0" * (1 << 20)
    fd = os.open(out / "hidden", os.O_WRONLY | os.O_CREAT, 0o600)
    os.unlink(out / "hidden")
    try:
        for _ in range(200):
            held += os.write(fd, chunk)
    except OSError:
        pass
    os.write(ready_w, str(held).encode().ljust(32))
    time.sleep(600)
print("HELD", int(os.read(ready_r, 32)), flush=True)
'''
UNLINKED_FALLOCATE = HEADER + '''
announce_training_start()
export(0)
fd = os.open(out / "hidden", os.O_WRONLY | os.O_CREAT, 0o600)
os.unlink(out / "hidden")
held = 0
for _ in range(200):
    try:
        os.posix_fallocate(fd, held, 1 << 20)
    except OSError:
        break
    held += 1 << 20
print("HELD", held, flush=True)
time.sleep(2)
'''
# Class 7: the old tolerance (5% + 3 s past the budget) used as budget: trains from the (old) start line, placed
# at the end of the compile allowance, to within the tolerance, with a checkpoint exported up front.
TOLERANCE = HEADER + '''
export(0)
compute_until(COMPILE + 1)
announce_training_start()
compute_until(COMPILE + 1 + 1.05 * BUDGET + 1.5)
'''

CASES = {"before_start_line": ("tight", BEFORE_START_LINE), "in_export_window": ("tight", IN_EXPORT_WINDOW),
         "tolerance": ("tight", TOLERANCE), "after_the_exit": ("roomy", AFTER_THE_EXIT),
         "unlinked_detached": ("roomy", UNLINKED_DETACHED), "unlinked_fallocate": ("roomy", UNLINKED_FALLOCATE)}


@pytest.fixture(scope="module")
def clock_runners(trainer_image: str, prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        dict[str, StageRunner]]:
    backend = DockerBackend(INSTANCE)
    runners = {kind: StageRunner(backend, image=trainer_image, trainer_dir=REPO_ROOT / "trainer", data_dir=prepared_data,
                                 work_dir=tmp_path_factory.mktemp(f"redteam-clock-{kind}"), instance=INSTANCE,
                                 train_limits=limits, eval_limits=EVAL_LIMITS, env=env)
               for kind, env, limits in (("tight", CLOCK_ENV, TRAIN_LIMITS), ("roomy", ROOMY_ENV, ROOMY_LIMITS))}
    yield runners
    backend.close()


@pytest.fixture(scope="module")
def outcomes(clock_runners: dict[str, StageRunner], baseline_source: str) -> dict[str, StageOutcome]:
    sources = {**CASES, "honest_baseline": ("roomy", baseline_source)}
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(clock_runners[kind].run, 9700 + i, 1, source, 0)
                   for i, (name, (kind, source)) in enumerate(sorted(sources.items()))}
        return {name: future.result() for name, future in futures.items()}


def _train_json(outcome: StageOutcome) -> dict:
    return json.loads(outcome.train.files["train.json"])


def _over_budget(outcome: StageOutcome) -> None:
    assert outcome.status == "timeout" and outcome.val_bpb is None, (outcome.status, outcome.error,
                                                                      outcome.log_tail[-800:])
    assert "still running at the stage's deadline" in outcome.error, outcome.error
    assert _train_json(outcome)["deadline_seconds"] == COMPILE + BUDGET + 1.0


def _held_bytes(outcome: StageOutcome) -> int:
    return int(next(line.split()[1] for line in outcome.log_tail.splitlines() if line.startswith("HELD ")))


def test_honest_baseline_is_scored_within_its_deadline(outcomes: dict[str, StageOutcome]) -> None:
    """The shipped train.py, on the same clock, is `ok`: it trains at most the budget and ends before the deadline
    (a roomy compile allowance: on a loaded machine its imports alone may take longer than the tight one)."""
    outcome = outcomes["honest_baseline"]
    assert outcome.status == "ok" and outcome.val_bpb is not None, (outcome.error, outcome.log_tail[-800:])
    # Its last step may end a little past the budget (a step's length on a loaded CPU); the harness's deadline,
    # compile + budget + max(1 s, 2%), is what bounds it, and the run was not past that (status ok).
    assert 0 < outcome.summary["training_seconds"] <= BUDGET + max(SLACK_MIN_SECONDS, SLACK_FRACTION * BUDGET)
    assert _train_json(outcome)["over_budget"] == ""


def test_training_before_the_start_line_is_over_budget(outcomes: dict[str, StageOutcome]) -> None:
    """Class 1: compute before the start line counts; a candidate still computing at the deadline is never scored."""
    _over_budget(outcomes["before_start_line"])


def test_training_in_the_export_window_is_over_budget(outcomes: dict[str, StageOutcome]) -> None:
    """Class 2: an early export line ends nothing; training on after it, silenced, runs into the deadline."""
    _over_budget(outcomes["in_export_window"])


def test_the_old_tolerance_is_not_budget(outcomes: dict[str, StageOutcome]) -> None:
    """Class 7: computing to budget + 5% + 1.5 s past the compile allowance is past the 2% slack: never scored."""
    _over_budget(outcomes["tolerance"])


def test_a_process_left_after_the_exit_cannot_swap_the_checkpoint(outcomes: dict[str, StageOutcome]) -> None:
    """Class 3: the detached process dies with the exit, before the checkpoint is copied: the scored checkpoint is
    the one the candidate had at its exit, whatever the harness's clean-up took."""
    outcome = outcomes["after_the_exit"]
    assert outcome.status == "ok" and outcome.eval is not None, (outcome.error, outcome.log_tail[-800:])
    exported = next(line.split()[1] for line in outcome.log_tail.splitlines() if line.startswith("EXPORTED "))
    assert json.loads(outcome.eval.files["result.json"])["checkpoint_sha256"] == exported


@pytest.mark.parametrize("case", ["unlinked_detached", "unlinked_fallocate"])
def test_unlinked_files_count_against_the_quota(outcomes: dict[str, StageOutcome], case: str) -> None:
    """Class 4: bytes held in files unlinked while open, by a detached process or through fallocate, stop at the
    work dir's size: the kernel enforces the quota, and none of it is host disk."""
    outcome = outcomes[case]
    assert _held_bytes(outcome) <= QUOTA, outcome.log_tail[-800:]
    assert set(outcome.train.files) <= {"train.json", "model.pt2"}


def test_no_clock_container_is_left(outcomes: dict[str, StageOutcome]) -> None:
    """Every container of these runs was removed (other red-team modules may be running beside this one)."""
    assert len(outcomes) == len(CASES) + 1
    assert [c for c in our_containers() if c.name.startswith(f"autoresearch-{INSTANCE}-97")] == []  # type: ignore[attr-defined]
