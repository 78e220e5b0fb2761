"""harness.py: the train stage runs a real candidate, the eval stage scores a checkpoint it does not trust."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from trainer import eval_stage, harness, inference, prepare, privsep
from trainer.clock import TimeRules
from trainer.prepare import export_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_ENV = {"AUTORESEARCH_PRESET": "tiny", "AUTORESEARCH_TIME_BUDGET": "4", "AUTORESEARCH_SEED": "0"}


def _run_train(candidate: Path, data: Path, out: Path, timeout: float = 300,
               budget: str = TINY_ENV["AUTORESEARCH_TIME_BUDGET"],
               compile_budget: str = "120") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(TINY_ENV, PYTHONPATH=str(REPO_ROOT), AUTORESEARCH_TIME_BUDGET=budget,
               AUTORESEARCH_COMPILE_BUDGET=compile_budget)
    return subprocess.run([sys.executable, "-m", "trainer.harness", "train", "--candidate", str(candidate),
                           "--data", str(data), "--out", str(out)],
                          env=env, text=True, capture_output=True, timeout=timeout, check=False)


def _run_eval(checkpoint: Path, data: Path, out: Path, monkeypatch: pytest.MonkeyPatch,
              tokens: int = 4096) -> tuple[int, dict]:
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", str(tokens))
    code = harness.main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)])
    result_path = out / "result.json"
    return code, json.loads(result_path.read_text()) if result_path.exists() else {}


class _TokenModel(torch.nn.Module):
    """A small causal stand-in model; `mix` makes it peek along the sequence or across the batch."""

    def __init__(self, vocab_size: int, mix: str = "") -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.mix = mix
        peek = torch.ones(1024)
        peek[[0, 341, 512, 812, 1022]] = 0.0
        self.register_buffer("peek", peek)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding(idx)
        if self.mix == "sequence":
            hidden = hidden + hidden.mean(dim=1, keepdim=True)
        elif self.mix == "batch":
            hidden = hidden + hidden.mean(dim=0, keepdim=True)
        elif self.mix == "offset":  # a small peek at the next token, hidden under a softmax-invariant offset
            return self.head(hidden + 0.3 * torch.roll(hidden, -1, dims=1)) + 1e4
        elif self.mix == "sly":  # peeks only in batches of 3+ rows and never at the old probe's fixed cuts
            gate = (idx.new_ones(idx.shape[0]).sum() > 2).to(hidden.dtype)
            hidden = hidden + gate * self.peek[None, :, None] * torch.roll(hidden, -1, dims=1)
        elif self.mix == "sparse":  # peeks at odd positions only
            odd_positions = (torch.arange(idx.shape[1]) % 2 == 1).to(hidden.dtype)
            hidden = hidden + odd_positions[None, :, None] * torch.roll(hidden, -1, dims=1)
        elif self.mix == "gated_row":  # peeks only in rows that start with an odd token (a row property)
            odd = (idx[:, :1] % 2 == 1).to(hidden.dtype)
            hidden = hidden + odd[:, :, None] * torch.roll(hidden, -1, dims=1)
        elif self.mix == "next_row":  # the last position reads the next row's first token (its true target)
            last = (torch.arange(idx.shape[1]) == idx.shape[1] - 1).to(hidden.dtype)
            hidden = hidden + last[None, :, None] * torch.roll(hidden[:, :1], -1, dims=0)
        return self.head(hidden)


# The baseline with its stop rule and LR schedule counted in steps instead of seconds, so that what the
# tests see does not depend on how fast (or how loaded) the machine is.
STEP_BASED = {
    "PRINT_EVERY_SECONDS = 2.0": "PRINT_EVERY_SECONDS = 0.0",
    "progress = step / max_steps if max_steps else training_time / train_seconds": "progress = step / 30",
    "if training_time >= train_seconds or 0 < max_steps <= step:": "if step >= 30:",
}


@pytest.fixture(scope="module")
def baseline_run(baseline_source: str, prepared_data: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    work = tmp_path_factory.mktemp("baseline")
    source = baseline_source
    for old, new in STEP_BASED.items():
        assert old in source, f"the baseline no longer contains {old!r}"
        source = source.replace(old, new)
    (work / "train.py").write_text(source)
    # Its stop rule counts steps, not seconds: the harness's budget (which it enforces) must not bind.
    return _run_train(work / "train.py", prepared_data / "train", work / "out", budget="600"), work / "out"


@pytest.mark.slow
def test_baseline_training_lowers_the_loss(baseline_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """A short real CPU run (30 steps) exits 0, lowers its loss and leaves a checkpoint and train.json."""
    completed, out = baseline_run
    assert completed.returncode == 0, completed.stdout[-2000:]
    losses = [float(v) for v in re.findall(r"\| loss ([0-9.]+) \|", completed.stdout)]
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.5
    train_json = json.loads((out / "train.json").read_text())
    assert train_json["exit_code"] == 0 and train_json["wall_seconds"] > 0
    assert train_json["summary"]["depth"] == 2 and train_json["summary"]["num_steps"] == 30
    assert (out / "model.pt2").is_file()


@pytest.mark.slow
def test_baseline_checkpoint_gets_a_finite_val_bpb(baseline_run: tuple[subprocess.CompletedProcess[str], Path],
                                                   prepared_data: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval stage passes the baseline through the causality probe and scores it."""
    _, out = baseline_run
    code, result = _run_eval(out / "model.pt2", prepared_data / "val", tmp_path, monkeypatch)
    assert code == 0
    assert result["status"] == "ok" and result["probe"] == "passed" and result["error"] == ""
    assert math.isfinite(result["val_bpb"]) and 0 < result["val_bpb"] < 9  # 9 bits ≈ a uniform guess over 512
    assert result["vocab_size"] == 512 and result["num_params"] > 0 and len(result["checkpoint_sha256"]) == 64


@pytest.mark.slow
def test_nan_loss_fails_fast(baseline_source: str, prepared_data: Path, tmp_path: Path) -> None:
    """A candidate whose loss is NaN stops at once with a clear message and a non-zero exit."""
    candidate = tmp_path / "train.py"
    candidate.write_text(baseline_source.replace("LOGIT_SOFTCAP = 15.0", "LOGIT_SOFTCAP = float('nan')"))
    completed = _run_train(candidate, prepared_data / "train", tmp_path / "out")
    assert completed.returncode == 1
    assert "FAIL: loss is nan at step 0" in completed.stdout
    assert json.loads((tmp_path / "out" / "train.json").read_text())["exit_code"] == 1


def test_clean_exit_without_checkpoint_is_exit_4(prepared_data: Path, tmp_path: Path) -> None:
    """A candidate that exits 0 but exports nothing makes the train stage fail."""
    candidate = tmp_path / "train.py"
    candidate.write_text("print('---')\nprint('num_steps: 3')\n")
    completed = _run_train(candidate, prepared_data / "train", tmp_path / "out")
    assert completed.returncode == harness.EXIT_NO_CHECKPOINT
    assert json.loads((tmp_path / "out" / "train.json").read_text())["summary"] == {"num_steps": 3.0}


# Forks a sleeper that inherits stdout (so the pipe stays open), writes a checkpoint and exits 0.
LINGERING_CHILD_CANDIDATE = """
import os, subprocess, sys
from pathlib import Path
out = Path(os.environ["AUTORESEARCH_OUT_DIR"])
sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]{extra})
(out / "sleeper.pid").write_text(str(sleeper.pid))
(out / "model.pt2").write_bytes(b"stand-in")
print("---")
print("num_steps: 7")
"""


def _process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_train_stage_ends_when_the_candidate_exits(prepared_data: Path, tmp_path: Path) -> None:
    """A background process holding the candidate's stdout neither stretches the stage nor survives it."""
    candidate = tmp_path / "train.py"
    candidate.write_text(LINGERING_CHILD_CANDIDATE.format(extra=""))
    completed = _run_train(candidate, prepared_data / "train", tmp_path / "out", timeout=120)  # sleeper: 600 s
    assert completed.returncode == 0, completed.stdout
    assert json.loads((tmp_path / "out" / "train.json").read_text())["summary"] == {"num_steps": 7.0}
    sleeper = int((tmp_path / "out" / "sleeper.pid").read_text())
    for _ in range(100):  # the kernel's reaping of the killed sleeper is asynchronous
        if not _process_alive(sleeper):
            break
        time.sleep(0.05)
    assert not _process_alive(sleeper)


def test_train_stage_ends_when_an_escaped_process_holds_stdout(prepared_data: Path, tmp_path: Path) -> None:
    """A sleeper in a session of its own (out of the harness's reach) still cannot hold the stage open."""
    candidate = tmp_path / "train.py"
    candidate.write_text(LINGERING_CHILD_CANDIDATE.format(extra=", start_new_session=True"))
    try:
        completed = _run_train(candidate, prepared_data / "train", tmp_path / "out", timeout=120)
        assert completed.returncode == 0 and "num_steps: 7" in completed.stdout
    finally:
        pid_file = tmp_path / "out" / "sleeper.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_terminated_harness_takes_the_candidate_with_it(prepared_data: Path, tmp_path: Path) -> None:
    """SIGTERM to the harness kills the candidate's whole session, which does not get the signal itself."""
    candidate = tmp_path / "train.py"
    candidate.write_text("import os, pathlib, time\n"
                         "pathlib.Path(os.environ['AUTORESEARCH_OUT_DIR'], 'candidate.pid').write_text(str(os.getpid()))\n"
                         "time.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    out = tmp_path / "out"
    harness_process = subprocess.Popen([sys.executable, "-m", "trainer.harness", "train", "--candidate", str(candidate),
                                        "--data", str(prepared_data / "train"), "--out", str(out)],
                                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / "candidate.pid").exists() or not (out / "candidate.pid").read_text():
            assert harness_process.poll() is None, "the harness exited before the candidate started"
            time.sleep(0.05)
        candidate_pid = int((out / "candidate.pid").read_text())
        harness_process.send_signal(signal.SIGTERM)
        assert harness_process.wait(timeout=60) == 128 + signal.SIGTERM
        for _ in range(100):
            if not _process_alive(candidate_pid):
                break
            time.sleep(0.05)
        assert not _process_alive(candidate_pid)
    finally:
        harness_process.kill()


# Writes a stand-in checkpoint after "training" for `seconds`: sleeping or computing, with or without the marker
# lines (which no longer move the clock: the whole stage counts from the spawn).
OVERRUN_CANDIDATE = """
import os, time
from pathlib import Path
from trainer.layout import announce_export_start, announce_training_start
if {markers}:
    announce_export_start()
end = time.monotonic() + {seconds}
while time.monotonic() < end:
    if {busy}:
        sum(range(10000))
    else:
        time.sleep(0.05)
if {markers}:
    announce_training_start()
(Path(os.environ["AUTORESEARCH_OUT_DIR"]) / "model.pt2").write_bytes(b"stand-in")
"""


@pytest.mark.parametrize(("markers", "busy"), [(False, False), (True, False), (True, True)])
def test_running_past_the_deadline_is_over_budget(prepared_data: Path, tmp_path: Path, markers: bool,
                                                  busy: bool) -> None:
    """A candidate still running at compile allowance + budget + slack is killed there: exit 5, whatever it printed."""
    candidate = tmp_path / "train.py"
    candidate.write_text(OVERRUN_CANDIDATE.format(markers=markers, busy=busy, seconds=600))
    completed = _run_train(candidate, prepared_data / "train", tmp_path / "out", timeout=120, compile_budget="2")
    assert completed.returncode == harness.EXIT_OVER_BUDGET, completed.stdout
    train_json = json.loads((tmp_path / "out" / "train.json").read_text())
    assert train_json["over_budget"].startswith("the candidate was still running at the stage's deadline")
    assert train_json["deadline_seconds"] == 7.0  # compile 2 + budget 4 + slack max(1, 2% of 4)


def test_finishing_before_the_deadline_is_clean(prepared_data: Path, tmp_path: Path) -> None:
    """The same candidate done inside the stage's deadline exits 0 with no over-budget reason."""
    candidate = tmp_path / "train.py"
    candidate.write_text(OVERRUN_CANDIDATE.format(markers=True, busy=False, seconds=0.5))
    completed = _run_train(candidate, prepared_data / "train", tmp_path / "out")
    assert completed.returncode == 0, completed.stdout
    assert json.loads((tmp_path / "out" / "train.json").read_text())["over_budget"] == ""


def test_the_candidate_is_told_the_deadline_it_must_meet(prepared_data: Path, tmp_path: Path) -> None:
    """The candidate sees AUTORESEARCH_DEADLINE: in its future, at most compile budget + budget after its start."""
    candidate = tmp_path / "train.py"
    candidate.write_text("import os, time\nfrom pathlib import Path\n"
                         "out = Path(os.environ['AUTORESEARCH_OUT_DIR'])\n"
                         "(out / 'seen').write_text(f\"{time.monotonic()} {os.environ['AUTORESEARCH_DEADLINE']}\")\n"
                         "(out / 'model.pt2').write_bytes(b'x')\n")
    completed = _run_train(candidate, prepared_data / "train", tmp_path / "out", compile_budget="50")
    assert completed.returncode == 0, completed.stdout
    now, deadline = map(float, (tmp_path / "out" / "seen").read_text().split())
    assert now < deadline <= now + 54


def test_time_rules_give_one_deadline_with_a_two_percent_slack() -> None:
    """Compile allowance + budget is the target; the slack is 2% of the budget (at least 1 s), nothing else."""
    rules = TimeRules(budget_s=300.0, compile_s=120.0)
    assert (rules.target_s, rules.slack_s, rules.hard_s) == (420.0, 6.0, 426.0)
    assert TimeRules(budget_s=10.0, compile_s=0.0).hard_s == 11.0
    assert TimeRules.from_env({"AUTORESEARCH_TIME_BUDGET": "8"}) == TimeRules(8.0, 120.0)
    assert TimeRules.from_env({}) is None


def test_the_checkpoint_is_copied_out_of_the_work_dir(tmp_path: Path) -> None:
    """fix_checkpoint copies a regular checkpoint into the result dir, readable by all."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "model.pt2").write_bytes(b"weights" * 1000)
    (work / "model.pt2").chmod(0o600)
    assert harness.fix_checkpoint(work, out)
    assert (out / "model.pt2").read_bytes() == b"weights" * 1000
    assert (out / "model.pt2").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder", "missing"])
def test_only_a_regular_checkpoint_is_copied(tmp_path: Path, kind: str) -> None:
    """A link, a fifo, a folder or nothing at the checkpoint's name leaves no checkpoint in the result dir."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (tmp_path / "secret").write_bytes(b"host file")
    if kind == "symlink":
        (work / "model.pt2").symlink_to(tmp_path / "secret")
    elif kind == "fifo":
        os.mkfifo(work / "model.pt2")
    elif kind == "folder":
        (work / "model.pt2").mkdir()
    assert not harness.fix_checkpoint(work, out)
    assert sorted(p.name for p in out.iterdir()) == []


def _spawn_detached_sleepers(uid: int) -> list[int]:
    """As `uid`: a sleeper in its own session and a double-forked one (its parent gone); their pids."""
    script = ("setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!; "
              "( sleep 600 </dev/null >/dev/null 2>&1 & echo $! )")
    completed = subprocess.run(["/bin/sh", "-c", script], user=uid, group=uid, extra_groups=[], text=True,
                               capture_output=True, timeout=60, check=True, cwd="/")
    return [int(pid) for pid in completed.stdout.split()]


@pytest.mark.skipif(os.geteuid() != 0, reason="killing another uid's processes needs root (CAP_SETUID)")
def test_kill_uid_ends_every_process_of_the_uid_however_detached() -> None:
    """Processes of the candidate's uid in their own session or double-forked all die; other processes live."""
    uid = 54321
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    pids = _spawn_detached_sleepers(uid)
    try:
        assert all(_process_alive(pid) for pid in pids) and set(pids) <= set(privsep.live_processes(uid))
        assert privsep.kill_uid(uid)
        assert privsep.live_processes(uid) == [] and not any(_process_alive(pid) for pid in pids)
        assert _process_alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_bad_budget_setting_is_refused(prepared_data: Path, tmp_path: Path) -> None:
    """A budget that is not a positive number stops the train stage with exit 2 before the candidate runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(PYTHONPATH=str(REPO_ROOT), AUTORESEARCH_TIME_BUDGET="soon")
    completed = subprocess.run([sys.executable, "-m", "trainer.harness", "train", "--candidate",
                                str(REPO_ROOT / "trainer" / "train.py"), "--data", str(prepared_data / "train"),
                                "--out", str(tmp_path)], env=env, text=True, capture_output=True, check=False)
    assert completed.returncode == harness.EXIT_USAGE and not (tmp_path / "train.json").exists()


def test_out_dir_over_its_total_quota_stops_the_candidate(prepared_data: Path, tmp_path: Path) -> None:
    """Many files under the per-file cap but over the total quota: the candidate is killed, exit 6."""
    candidate = tmp_path / "train.py"
    candidate.write_text("import os, time\nfrom pathlib import Path\nout = Path(os.environ['AUTORESEARCH_OUT_DIR'])\n"
                         "for i in range(12):\n    (out / f'f{i}').write_bytes(os.urandom(1 << 20))\n"
                         "time.sleep(30)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(PYTHONPATH=str(REPO_ROOT), AUTORESEARCH_OUT_QUOTA=str(4 << 20))
    completed = subprocess.run([sys.executable, "-m", "trainer.harness", "train", "--candidate", str(candidate),
                                "--data", str(prepared_data / "train"), "--out", str(tmp_path / "out")],
                               env=env, text=True, capture_output=True, timeout=120, check=False)
    assert completed.returncode == harness.EXIT_OUT_QUOTA, completed.stdout
    assert "quota" in json.loads((tmp_path / "out" / "train.json").read_text())["out_quota"]


def test_out_dir_usage_counts_locked_folders(tmp_path: Path) -> None:
    """A folder chmod 000 by the candidate (same user) is reopened and counted."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "data").write_bytes(b"x" * 100_000)
    locked.chmod(0)
    try:
        used, entries = harness.out_dir_usage(tmp_path, 100)
    finally:
        locked.chmod(0o700)
    assert used >= 100_000 and entries == 2


def test_train_stage_does_not_import_torch() -> None:
    """The harness and the train stage's helpers load without torch (the candidate pays for its own)."""
    code = "import sys, trainer.harness; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=False).returncode == 0


@pytest.mark.parametrize("split", ["val", "."])
def test_train_refuses_to_see_the_val_split(prepared_data: Path, tmp_path: Path, split: str) -> None:
    """The train stage exits 3 when its data folder is the val split or holds one."""
    code = harness.main(["train", "--candidate", str(REPO_ROOT / "trainer" / "train.py"),
                         "--data", str(prepared_data / split), "--out", str(tmp_path)])
    assert code == harness.EXIT_WRONG_SPLIT
    assert not (tmp_path / "train.json").exists()


def test_eval_refuses_to_see_the_train_split(prepared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval stage exits 3 when its data folder is the train split."""
    code, result = _run_eval(tmp_path / "model.pt2", prepared_data / "train", tmp_path, monkeypatch)
    assert code == harness.EXIT_WRONG_SPLIT and result == {}


def test_probe_catches_a_model_that_sees_the_future(prepared_data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits that depend on later tokens make the result invalid, with no val_bpb."""
    export_checkpoint(_TokenModel(512, mix="sequence"), tmp_path)
    code, result = _run_eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / "eval", monkeypatch)
    assert code == 0
    assert result["status"] == "invalid" and result["val_bpb"] is None
    assert "when only tokens after" in result["probe"]


def test_probe_catches_a_model_that_reads_other_rows(prepared_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of the eval batch are consecutive text, so mixing rows is peeking too."""
    export_checkpoint(_TokenModel(512, mix="batch"), tmp_path)
    code, result = _run_eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / "eval", monkeypatch)
    assert code == 0 and result["status"] == "invalid"
    assert "other rows" in result["probe"]


def test_causal_stand_in_model_passes_the_probe(prepared_data: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that only looks at the current token is scored."""
    export_checkpoint(_TokenModel(512), tmp_path)
    code, result = _run_eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / "eval", monkeypatch)
    assert code == 0 and result["status"] == "ok" and math.isfinite(result["val_bpb"])


def test_checkpoint_is_rewritten_for_another_device(tmp_path: Path) -> None:
    """The eval stage's loader moves the whole exported program (weights and graph) to a non-CPU device."""
    export_checkpoint(_TokenModel(512), tmp_path)
    model, num_params = inference.load_program(str(tmp_path / "model.pt2"), torch.device("meta"))
    logits = model(torch.zeros(3, 1024, dtype=torch.int64, device="meta"))
    assert logits.device.type == "meta" and tuple(logits.shape) == (3, 1024, 512)
    assert num_params == 512 * 8 + 8 * 512 + 512


def test_checkpoint_for_another_vocabulary_is_rejected(prepared_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with 300 logits against a 512-token tokenizer is invalid with a clear reason."""
    export_checkpoint(_TokenModel(300), tmp_path)
    code, result = _run_eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / "eval", monkeypatch)
    assert code == 0 and result["status"] == "invalid"
    assert "another vocabulary" in result["error"] and "vocab 512" in result["error"]


def test_garbage_checkpoint_is_invalid(prepared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that is not an exported program is reported, not crashed on."""
    (tmp_path / "model.pt2").write_bytes(b"not a zip archive")
    code, result = _run_eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / "eval", monkeypatch)
    assert code == 0 and result["status"] == "invalid"
    assert "not a loadable torch.export program" in result["error"]


def test_bad_eval_token_setting_is_refused(prepared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AUTORESEARCH_EVAL_TOKENS that is not a positive integer stops eval with exit 2."""
    monkeypatch.setenv("AUTORESEARCH_EVAL_TOKENS", "lots")
    code = harness.main(["eval", "--checkpoint", str(tmp_path / "m.pt2"), "--data", str(prepared_data / "val"),
                         "--out", str(tmp_path)])
    assert code == harness.EXIT_USAGE and not (tmp_path / "result.json").exists()


def test_parse_summary_reads_the_last_block() -> None:
    """Only `key: number` lines after the last `---` count; other lines are skipped."""
    text = "---\nnum_steps: 1\nstep 5 | loss 3.2\n---\ntraining_seconds: 300.1\nnote: fast\nnum_steps:        953\n"
    assert harness.parse_summary(text) == {"training_seconds": 300.1, "num_steps": 953.0}


class _Exploit:
    """Runs a shell command when unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def _rewrite_archive(path: Path, edit: Callable[[dict[str, bytes]], None]) -> None:
    """Rewrite the .pt2 zip at `path` after `edit` changed its {name: bytes} entries."""
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    edit(entries)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def _pickled_weight(entries: dict[str, bytes], payload: bytes) -> None:
    config_name = next(name for name in entries if name.endswith("model_weights_config.json"))
    config = json.loads(entries[config_name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    entries[config_name] = json.dumps(config).encode()
    entries[config_name.rsplit("/", 1)[0] + "/" + first["path_name"]] = payload


@pytest.mark.parametrize("attack", ["use_pickle", "sample_inputs", "opaque_constant", "legacy_weights"])
def test_pickle_exploit_in_checkpoint_is_refused(prepared_data: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, attack: str) -> None:
    """An archive whose payloads torch would unpickle is invalid and its code never runs."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(f"touch {marker}"))
    export_checkpoint(_TokenModel(512), tmp_path)

    def edit(entries: dict[str, bytes]) -> None:
        root = next(iter(entries)).split("/", 1)[0]
        if attack == "use_pickle":
            _pickled_weight(entries, payload)
        elif attack == "sample_inputs":
            entries[f"{root}/data/sample_inputs/model.pt"] = payload
        elif attack == "opaque_constant":
            name = f"{root}/data/constants/model_constants_config.json"
            entries[name] = json.dumps({"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                                                         "use_pickle": True, "tensor_meta": None}}}).encode()
            entries[f"{root}/data/constants/opaque_obj_0"] = payload
        else:
            entries[f"{root}/data/weights/model.pt"] = payload

    _rewrite_archive(tmp_path / "model.pt2", edit)
    code, result = _run_eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / "eval", monkeypatch)
    assert not marker.exists()
    assert code == 0 and result["status"] == "invalid" and "unsafe" in result["error"]


def test_unpickling_is_refused_during_the_load_itself(tmp_path: Path) -> None:
    """Defence in depth: even past the archive check, torch.export.load may not unpickle objects."""
    marker = tmp_path / "pwned"
    export_checkpoint(_TokenModel(512), tmp_path)
    _rewrite_archive(tmp_path / "model.pt2", lambda entries: _pickled_weight(
        entries, pickle.dumps(_Exploit(f"touch {marker}"))))
    refused: list[str] = []
    with pytest.raises(prepare.UnsafeCheckpoint), prepare._refuse_unpickling(refused):
        torch.export.load(str(tmp_path / "model.pt2"))
    assert not marker.exists() and refused and pickle.loads is prepare._PICKLE_LOADS


def test_guards_code_and_foreign_graph_targets_are_refused(tmp_path: Path) -> None:
    """Graph strings torch would exec or resolve to arbitrary Python callables are refused."""
    export_checkpoint(_TokenModel(512), tmp_path)
    path = tmp_path / "model.pt2"
    prepare.check_checkpoint_archive(path)

    def edit_program(change: Callable[[dict], None]) -> Callable[[dict[str, bytes]], None]:
        def edit(entries: dict[str, bytes]) -> None:
            name = next(name for name in entries if name.endswith("models/model.json"))
            program = json.loads(entries[name])
            change(program)
            entries[name] = json.dumps(program).encode()
        return edit

    _rewrite_archive(path, edit_program(lambda program: program.update(guards_code=["__import__('os')"])))
    with pytest.raises(prepare.UnsafeCheckpoint, match="guards_code"):
        prepare.check_checkpoint_archive(path)
    export_checkpoint(_TokenModel(512), tmp_path)
    _rewrite_archive(path, edit_program(
        lambda program: program["graph_module"]["graph"]["nodes"][0].update(target="torch.os.system")))
    with pytest.raises(prepare.UnsafeCheckpoint, match=re.escape("torch.os.system")):
        prepare.check_checkpoint_archive(path)


@pytest.mark.parametrize("mix", ["offset", "sly", "sparse", "gated_row"])
def test_probe_catches_hidden_peeking(prepared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      mix: str) -> None:
    """Peeking under a huge logit offset, only at some batch sizes, positions or rows is caught (the 40 rows of
    the test split: a peek at every other position escapes them all with probability (5/8)^40, about 1e-8)."""
    export_checkpoint(_TokenModel(512, mix=mix), tmp_path)
    code, result = _run_eval(tmp_path / "model.pt2", prepared_data / "val", tmp_path / "eval", monkeypatch,
                             tokens=64 * 1024)
    assert code == 0 and result["status"] == "invalid" and result["val_bpb"] is None
    assert "when only tokens after" in result["probe"]


def _consecutive_rows_copy(val_dir: Path, target: Path) -> Path:
    """A copy of the val split whose meta.json names no BOS token: the eval cuts it into consecutive rows."""
    shutil.copytree(val_dir, target)
    meta_path = target / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["bos_id"]
    meta_path.chmod(0o644)
    meta_path.write_text(json.dumps(meta))
    return target


def test_probe_catches_a_peek_at_the_next_row(prepared_data: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """On consecutive rows (data without BOS), the last position reading the next row's first token (its true
    target in order) is caught."""
    export_checkpoint(_TokenModel(512, mix="next_row"), tmp_path)
    val = _consecutive_rows_copy(prepared_data / "val", tmp_path / "val")
    code, result = _run_eval(tmp_path / "model.pt2", val, tmp_path / "eval", monkeypatch, tokens=64 * 1024)
    assert code == 0 and result["status"] == "invalid" and result["val_bpb"] is None
    assert "other rows" in result["probe"]


def test_scoring_matches_evaluate_bpb_for_an_honest_model(prepared_data: Path) -> None:
    """Shuffled rows and probe twins change nothing in the number: it equals prepare.evaluate_bpb."""
    model = _TokenModel(512).eval()
    window = prepare.eval_token_window(prepared_data / "val", 8192)
    token_bytes = prepare.token_byte_lengths(prepare.load_tokenizer(prepared_data / "val"))
    with torch.no_grad():
        val_bpb, probe = eval_stage.score_window(model, window, token_bytes, 512, torch.device("cpu"))
    assert probe == "passed"
    assert val_bpb == pytest.approx(prepare.evaluate_bpb(model, window, token_bytes), rel=1e-6)


def test_probe_calls_look_like_scoring_calls(prepared_data: Path) -> None:
    """Every forward is an int64 (rows, SEQ_LEN) batch, two per scoring batch, and each scored row is probed."""
    model = _TokenModel(512).eval()
    calls: list[torch.Tensor] = []

    def recording(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch.clone())
        return model(batch)

    window = prepare.eval_token_window(prepared_data / "val", 40 * 1024)
    token_bytes = prepare.token_byte_lengths(prepare.load_tokenizer(prepared_data / "val"))
    with torch.no_grad():
        eval_stage.score_window(recording, window, token_bytes, 512, torch.device("cpu"))
    assert len(calls) == 2 * math.ceil(len(window) / prepare.EVAL_BATCH_SIZE)
    assert all(call.dtype == torch.int64 and call.shape[1] == prepare.SEQ_LEN for call in calls)
    assert [len(call) for call in calls[::2]] == [len(call) for call in calls[1::2]]
    assert sum(len(call) for call in calls) == 2 * len(window)


def test_lr_multiplier_never_exceeds_one() -> None:
    """The warm-up ramp is clamped at 1 just before warm-up ends."""
    from trainer import train
    assert train.lr_multiplier(train.WARMUP_FRACTION - 1e-6) == 1.0
    assert max(train.lr_multiplier(i / 1000) for i in range(1001)) == 1.0


def test_muon_keeps_one_momentum_buffer() -> None:
    """Muon allocates its momentum buffer once and updates it in place on later steps."""
    from trainer import train
    weight = torch.nn.Parameter(torch.randn(8, 4))
    optimizer = train.Muon([weight], lr=0.01)
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Calls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    weight.grad = torch.randn(8, 4)
    optimizer.step()
    first = optimizer.state[weight]["momentum_buffer"]
    weight.grad = torch.randn(8, 4)
    with _Calls() as calls:
        optimizer.step()
    assert optimizer.state[weight]["momentum_buffer"] is first
    assert not [name for name in calls.names if "zeros" in name or "empty_like" in name]
