"""Forging val_bpb, one hostile candidate per class of attack, through StageRunner on the real Docker engine.

Each candidate passes the edit guards (it is plain Python that exports a checkpoint) and each, on the code
before issue #11, came back as an honest `ok` run. Now none may: the checkpoint allow-list refuses code in
shape expressions, file-reading ops and mutated state; the probe catches gated and cross-row peeking; the
harness's clock catches training past the budget; a seed-blind replay is refused; the out dir has a total
quota and its clean-up survives locked folders.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.research.runner import StageOutcome, StageRunner
from sandbox.docker_backend import DockerBackend
from tests.redteam.redteam_helpers import EVAL_LIMITS, INSTANCE, REPO_ROOT, TRAIN_LIMITS, our_containers

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# 40 rows of the test split are scored (every row is probed); the out dir may hold 48 MiB in total.
# The compile allowance is roomy: the whole run (torch's import, the export) counts on the stage's one clock.
METRIC_ENV = {"AUTORESEARCH_TIME_BUDGET": "2", "AUTORESEARCH_COMPILE_BUDGET": "120", "AUTORESEARCH_PRESET": "tiny",
              "AUTORESEARCH_EVAL_TOKENS": str(40 * 1024), "AUTORESEARCH_OUT_QUOTA": str(48 * 1024**2)}

HEADER = '''
import json, os, zipfile
from pathlib import Path
import torch
from trainer.layout import announce_training_start
from trainer.prepare import export_checkpoint, read_split_meta
out = Path(os.environ["AUTORESEARCH_OUT_DIR"])
vocab = int(read_split_meta(os.environ["AUTORESEARCH_DATA_DIR"])["vocab_size"])
torch.manual_seed(int(os.environ.get("AUTORESEARCH_SEED", "0")))
announce_training_start()

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.e = torch.nn.Embedding(vocab, 16)
        self.h = torch.nn.Linear(16, vocab)
    def mix(self, idx, hidden):
        return hidden
    def forward(self, idx):
        return self.h(self.mix(idx, self.e(idx)))

def rewrite(edit):
    path = out / "model.pt2"
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    name = next(name for name in entries if name.endswith("models/model.json"))
    program = json.loads(entries[name])
    edit(program)
    entries[name] = json.dumps(program).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
'''

SYMPY_CODE = HEADER + '''
export_checkpoint(Tiny(), out)
def plant(program):
    for tensor in program["graph_module"]["graph"]["tensor_values"].values():
        for size in tensor["sizes"]:
            if "as_expr" in size:
                size["as_expr"]["expr_str"] = ("(__import__('pathlib').Path('/out/pwned').write_text('x') and 1)*"
                                               + size["as_expr"]["expr_str"])
                return
rewrite(plant)
'''
FROM_FILE = HEADER + '''
torch.library.register_fake("aten::from_file")(lambda _n, _s=None, size=0, **kw: torch.empty(size, dtype=kw.get("dtype")))
class Reader(Tiny):
    def mix(self, idx, hidden):  # reads the val tokens while scoring (/data is the val split there)
        peek = torch.from_file("/data/tokens.bin", shared=False, size=64, dtype=torch.uint8)
        return hidden + 0.0 * peek.float().sum()
export_checkpoint(Reader(), out)
'''
STATEFUL = HEADER + '''
class Counter(Tiny):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
    def mix(self, idx, hidden):  # honest for the first calls (the old probe), then peeks at the next token
        self.calls.add_(1)
        return hidden + (self.calls > 4).float() * torch.roll(hidden, -1, dims=1)
export_checkpoint(Counter(), out)
'''
GATED_ROW = HEADER + '''
class Gated(Tiny):
    def mix(self, idx, hidden):  # peeks only in rows that start with an odd token (a row property)
        return hidden + (idx[:, :1] % 2 == 1).float()[:, :, None] * torch.roll(hidden, -1, dims=1)
export_checkpoint(Gated(), out)
'''
NEXT_ROW = HEADER + '''
class NextRow(Tiny):
    def mix(self, idx, hidden):  # the last position reads the next row's first token (its target, in order)
        last = (torch.arange(idx.shape[1]) == idx.shape[1] - 1).float()
        return hidden + last[None, :, None] * torch.roll(hidden[:, :1], -1, dims=0)
export_checkpoint(NextRow(), out)
'''
OVER_BUDGET = HEADER + '''
import time
time.sleep(float(os.environ["AUTORESEARCH_DEADLINE"]) - time.monotonic() + 5)  # "trains" past the deadline
export_checkpoint(Tiny(), out)
'''
SEED_BLIND = HEADER.replace('int(os.environ.get("AUTORESEARCH_SEED", "0"))', "1234") + '''
export_checkpoint(Tiny(), out)
'''
MANY_FILES = HEADER + '''
export_checkpoint(Tiny(), out)
for i in range(120):  # 120 files of 1 MiB: each under the per-file cap, together over the total quota
    (out / f"junk-{i}.bin").write_bytes(os.urandom(1024 * 1024))
import time
time.sleep(5)
'''
LOCKED_DIRS = HEADER + '''
for i in range(3):
    folder = out / f"locked-{i}" / "inner"
    folder.mkdir(parents=True)
    (folder / "file").write_bytes(b"x" * 1000)
    os.chmod(folder, 0)
    os.chmod(folder.parent, 0)
raise SystemExit(1)
'''

CASES = {"sympy_code": SYMPY_CODE, "from_file": FROM_FILE, "stateful": STATEFUL, "gated_row": GATED_ROW,
         "next_row": NEXT_ROW, "over_budget": OVER_BUDGET, "many_files": MANY_FILES, "locked_dirs": LOCKED_DIRS}


@pytest.fixture(scope="module")
def metric_runner(trainer_image: str, prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        StageRunner]:
    backend = DockerBackend(INSTANCE)
    yield StageRunner(backend, image=trainer_image, trainer_dir=REPO_ROOT / "trainer", data_dir=prepared_data,
                      work_dir=tmp_path_factory.mktemp("redteam-metric"), instance=INSTANCE,
                      train_limits=TRAIN_LIMITS, eval_limits=EVAL_LIMITS, env=METRIC_ENV)
    backend.close()


@pytest.fixture(scope="module")
def outcomes(metric_runner: StageRunner) -> dict[str, StageOutcome]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(metric_runner.run, 9500 + i, 1, source, 7)
                   for i, (name, source) in enumerate(sorted(CASES.items()))}
        runs = {name: future.result() for name, future in futures.items()}
    # The seed-blind candidate twice, as a confirmation run would: seeds 1 and 2, same source.
    runs["seed_blind_first"] = metric_runner.run(9590, 1, SEED_BLIND, 1)
    runs["seed_blind_replay"] = metric_runner.run(9591, 1, SEED_BLIND, 2)
    return runs


def _refused(outcome: StageOutcome, status: str, *fragments: str) -> None:
    assert outcome.status == status and outcome.val_bpb is None, (outcome.status, outcome.error, outcome.log_tail[-800:])
    for fragment in fragments:
        assert fragment in outcome.error, outcome.error


def test_code_in_a_shape_expression_never_runs(outcomes: dict[str, StageOutcome]) -> None:
    """Class 1: the planted expression is refused before the loader: invalid, and no file was written by it."""
    outcome = outcomes["sympy_code"]
    _refused(outcome, "invalid", "shape grammar")
    assert outcome.eval is not None and "pwned" not in outcome.eval.files


def test_an_op_that_reads_the_val_file_is_refused(outcomes: dict[str, StageOutcome]) -> None:
    """Class 2: aten.from_file in the graph is not on the allow-list."""
    _refused(outcomes["from_file"], "invalid", "from_file", "allow-list")


def test_a_program_with_state_across_calls_is_refused(outcomes: dict[str, StageOutcome]) -> None:
    """Class 3: a buffer mutated in place (honest for the probe, cheating afterwards) is refused."""
    _refused(outcomes["stateful"], "invalid", "allow-list")


def test_peeking_gated_on_a_row_property_is_caught(outcomes: dict[str, StageOutcome]) -> None:
    """Class 4: every scored row is probed, so peeking in some rows only is caught."""
    _refused(outcomes["gated_row"], "invalid", "causality probe failed")


def test_peeking_at_the_next_row_learns_nothing(outcomes: dict[str, StageOutcome]) -> None:
    """Class 4: scored rows start at a document's BOS, so the next row's first token is always BOS, never the
    last position's target: the peek reads a constant and the program is scored as the causal model it then
    is. (On consecutive rows, where the peek is a leak, the probe catches it: tests/trainer.)"""
    outcome = outcomes["next_row"]
    assert outcome.status == "ok" and outcome.probe == "passed", (outcome.status, outcome.error)


def test_training_past_the_budget_is_a_timeout(outcomes: dict[str, StageOutcome]) -> None:
    """Class 6: training past the stage's deadline (compile allowance + budget) is `timeout` by the harness's clock."""
    _refused(outcomes["over_budget"], "timeout", "over budget", "still running at the stage's deadline")


def test_a_seed_blind_rerun_is_refused_as_a_replay(outcomes: dict[str, StageOutcome]) -> None:
    """Class 7: the same code under another seed giving a byte-identical checkpoint is a replay, not a result."""
    assert outcomes["seed_blind_first"].status == "ok"
    _refused(outcomes["seed_blind_replay"], "invalid", "replay", "AUTORESEARCH_SEED")


def test_many_files_under_the_per_file_cap_hit_the_total_quota(outcomes: dict[str, StageOutcome]) -> None:
    """Class 9: 120 MiB in 1 MiB files passes the per-file cap but not the 48 MiB total quota."""
    _refused(outcomes["many_files"], "crashed", "quota")


def test_locked_folders_are_cleaned_up(outcomes: dict[str, StageOutcome], metric_runner: StageRunner) -> None:
    """Class 9: folders the sandbox locked (chmod 000) are removed with the run's out dirs."""
    assert outcomes["locked_dirs"].status == "crashed"
    for name in ("train_out", "eval_out"):
        assert not (metric_runner.work_dir / f"{9500 + sorted(CASES).index('locked_dirs')}-1" / name).exists()
    leftovers = [p for p in metric_runner.work_dir.rglob("*") if p.name.startswith(("junk-", "locked-"))]
    assert leftovers == []


def test_no_metric_container_is_left(outcomes: dict[str, StageOutcome]) -> None:
    """Every container of these runs (and of the clean-up) was removed."""
    assert len(outcomes) == len(CASES) + 2
    assert our_containers() == []
