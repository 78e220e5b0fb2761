"""Trusted entrypoint of the trainer container: the `train` and `eval` stages.

    python3 -m trainer.harness train --candidate /candidate/train.py --data /data --out /out
    python3 -m trainer.harness eval --checkpoint /checkpoint/model.pt2 --data /data --out /out

train runs the candidate in a child process in its own session (with AUTORESEARCH_DATA_DIR /
AUTORESEARCH_OUT_DIR set), waits for that process to exit, kills whatever it left behind, measures its wall
time itself and writes train.json. eval (trainer.eval_stage) loads the exported checkpoint (no candidate
code runs), probes it for causality, computes val_bpb with prepare.py's code and writes result.json.
Under the sandbox (AUTORESEARCH_PRIVSEP, trainer.privsep) the candidate runs as its own uid while this harness
stays the container's root, so the candidate can neither signal it nor touch its memory, its clock or its
report. The numbers a candidate prints are informational only. This module imports no torch: the train stage
does not need it, and the candidate pays for its own import.
The harness owns time: it splits the candidate's run at the marker lines (trainer.layout) by its own
clock and a clean run over budget exits 5 (the daemon records `timeout`, never a score).
Exit codes: 0 ok (eval: result.json written, even for `invalid`), 3 wrong split visible,
2 bad arguments, 4 no checkpoint after a clean train run, 5 over budget, 6 out dir over its total quota
(the candidate is killed when it passes it), 1 eval crashed; train otherwise passes the candidate's own
exit status on.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import gc
import json
import os
import secrets
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from trainer import compile_cache, treewalk
from trainer.device_check import EXIT_NO_CUDA, stage_start
from trainer.layout import CHECKPOINT_NAME, EXPORT_STARTS, TRAINING_STARTS, DataError, read_split_meta
from trainer.privsep import PRIVSEP_ENV, stage_identities

EXIT_CRASH, EXIT_USAGE, EXIT_WRONG_SPLIT, EXIT_NO_CHECKPOINT, EXIT_OVER_BUDGET = 1, 2, 3, 4, 5
BUDGET_TOLERANCE = 0.05        # training may run this fraction past its budget,
BUDGET_SLACK_SECONDS = 3.0     # plus this (the last step and the summary after the stop rule fired)
STARTUP_SECONDS = 30.0         # imports, data and model set-up, on top of the compile budget
EXPORT_SECONDS = 60.0          # from the export line to the exit
EXIT_OUT_QUOTA = 6
OUT_QUOTA_BYTES = 16 * 1024**3 # the out dir in total (each file is also capped by the sandbox's fsize limit)
OUT_QUOTA_ENTRIES = 10_000
QUOTA_POLL_SECONDS = 0.5
OUTPUT_TAIL_BYTES = 64 * 1024  # of the candidate's output kept for the summary block
DRAIN_SECONDS = 2.0            # reading what is still in the pipe after the candidate exited
POLL_SECONDS = 0.1


def parse_summary(text: str) -> dict[str, float]:
    """The `key: number` lines after the last `---` line of a candidate's output."""
    lines = text.splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip() == "---"]
    summary: dict[str, float] = {}
    for line in lines[marks[-1] + 1:] if marks else []:
        key, sep, value = line.partition(":")
        if not sep:
            continue
        try:
            summary[key.strip()] = float(value.split()[0])
        except (ValueError, IndexError):
            continue
    return summary


def split_problem(data_dir: Path, wanted: str) -> str | None:
    """Why `data_dir` is not exactly the `wanted` split (None when it is)."""
    other = "val" if wanted == "train" else "train"
    if (data_dir / other).exists():
        return f"{data_dir} contains a {other}/ folder: mount only the {wanted} split"
    try:
        split = read_split_meta(data_dir).get("split")
    except DataError as exc:
        return str(exc)
    if split != wanted:
        return f"{data_dir} holds the {split!r} split; the {'eval' if wanted == 'val' else 'train'} stage needs {wanted!r}"
    return None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically, through a fresh file that follows no link the candidate planted, and
    over whatever it left at `path` (in a split train stage it shares the folder)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")
    try:
        os.replace(tmp, path)
    except OSError:  # a folder squats the name: ours to clear, whatever its depth (trainer.treewalk)
        treewalk.remove_tree(path)
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# train stage

@dataclass(frozen=True)
class TimeRules:
    """The harness's budget, read from the environment the daemon set (never from the candidate).

    The candidate's run is split by the harness's own clock at the first TRAINING_STARTS line and the last
    EXPORT_STARTS line: start-up and compilation (capped at the compile budget plus a start-up
    allowance), training (the budget plus BUDGET_TOLERANCE and BUDGET_SLACK_SECONDS), export (EXPORT_SECONDS). Without
    a start line, training is counted from the launch; without an export line, up to the exit."""

    budget_s: float
    compile_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TimeRules | None:
        raw = env.get("AUTORESEARCH_TIME_BUDGET", "").strip()
        if not raw:
            return None  # a bare developer run: nothing to enforce
        try:
            budget, compile_budget = float(raw), float(env.get("AUTORESEARCH_COMPILE_BUDGET", "120") or "120")
        except ValueError:
            raise ValueError(f"AUTORESEARCH_TIME_BUDGET/COMPILE_BUDGET are not numbers ({raw!r})") from None
        if not (0 < budget < 1e6 and 0 <= compile_budget < 1e6):
            raise ValueError(f"AUTORESEARCH_TIME_BUDGET={raw!r} is not a positive number of seconds")
        return cls(budget, compile_budget)

    def verdict(self, phases: dict[str, float]) -> str:
        """'' when the phases fit the budget, else why not (one line)."""
        limits = {"startup": self.compile_s + STARTUP_SECONDS, "training": self.budget_s * (1 + BUDGET_TOLERANCE) + BUDGET_SLACK_SECONDS,
                  "export": EXPORT_SECONDS}
        for phase, limit in limits.items():
            if phases.get(phase, 0.0) > limit:
                return (f"{phase} took {phases[phase]:.1f} s by the harness's clock, over its {limit:.1f} s allowance "
                        f"(budget {self.budget_s:g} s, compile budget {self.compile_s:g} s)")
        return ""


def split_phases(launched: float, started: float | None, export: float | None, ended: float) -> dict[str, float]:
    """Seconds of start-up, training and export from the harness's timestamps of the marker lines."""
    begin = started if started is not None else launched
    stop = export if export is not None and export >= begin else ended
    return {"startup": round(begin - launched, 3), "training": round(stop - begin, 3), "export": round(ended - stop, 3)}


class OutputRelay(threading.Thread):
    """Copies the candidate's output to ours and keeps its last OUTPUT_TAIL_BYTES.

    It reads with a timeout so that it can stop on request: a process the candidate left behind may hold
    the pipe open forever, and the stage must not wait for that."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.fd = stream.fileno()
        self.tail = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop_at: float | None = None
        self._line = bytearray()
        self.marks: dict[str, float] = {}  # marker line -> when the harness first read it

    def _note_markers(self, chunk: bytes) -> None:
        now = time.monotonic()
        self._line += chunk
        *lines, rest = bytes(self._line).split(b"\n")
        self._line = bytearray(rest[-4096:])
        for line in lines:
            text = line.strip().decode("utf-8", errors="replace")
            if text == TRAINING_STARTS and not self.marks:
                self.marks[TRAINING_STARTS] = now
            elif text == EXPORT_STARTS:  # the last one: an early export does not end the training clock
                self.marks[EXPORT_STARTS] = now

    def run(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd], [], [], POLL_SECONDS)
            if not ready:
                if self._stop_at is not None:
                    return  # the candidate is gone and the pipe is quiet
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return
            self._note_markers(chunk)
            self.tail += chunk
            del self.tail[:-OUTPUT_TAIL_BYTES]
            with contextlib.suppress(OSError, ValueError):  # our own output gone: keep draining the pipe anyway
                sys.stdout.write(self._decoder.decode(chunk))
                sys.stdout.flush()
            if self._stop_at is not None and time.monotonic() > self._stop_at:
                return  # something still writes after the candidate exited: stop listening to it

    def stop(self) -> None:
        """Drain what is already in the pipe (at most DRAIN_SECONDS), then return."""
        self._stop_at = time.monotonic() + DRAIN_SECONDS
        self.join(DRAIN_SECONDS + 1.0)


def _out_quota(env: Mapping[str, str]) -> tuple[int, int]:
    """(bytes, entries) the out dir may hold in total (AUTORESEARCH_OUT_QUOTA overrides the bytes)."""
    raw = env.get("AUTORESEARCH_OUT_QUOTA", "").strip()
    return (int(raw) if raw.isdigit() else OUT_QUOTA_BYTES), OUT_QUOTA_ENTRIES


def out_dir_usage(out_dir: Path, max_entries: int) -> tuple[int, int]:
    """(bytes, entries) under `out_dir`, never following symlinks; stops counting past max_entries."""
    total, entries, stack = 0, 0, [str(out_dir)]
    while stack and entries <= max_entries:
        folder = stack.pop()
        with contextlib.suppress(OSError):  # a folder the candidate locked (chmod 000) is ours to reopen
            if not os.access(folder, os.R_OK | os.X_OK):
                os.chmod(folder, 0o700)
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    entries += 1
                    with contextlib.suppress(OSError):
                        info = entry.stat(follow_symlinks=False)
                        total += info.st_blocks * 512 if hasattr(info, "st_blocks") else info.st_size
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
        except OSError:  # still unreadable: it counts as the one entry it is
            continue
    return total, entries


def _wait_within_quota(child: subprocess.Popen[bytes], out_dir: Path, quota: tuple[int, int]) -> tuple[int, str]:
    """Wait for the candidate; kill its session if the out dir passes the total quota. (returncode, problem)."""
    limit_bytes, limit_entries = quota
    while True:
        try:
            return child.wait(timeout=QUOTA_POLL_SECONDS), ""
        except subprocess.TimeoutExpired:
            pass
        used, entries = out_dir_usage(out_dir, limit_entries)
        if used > limit_bytes or entries > limit_entries:
            _kill_session(child.pid)
            returncode = child.wait()
            return returncode, (f"the candidate wrote {used} bytes in {entries} entries under its out dir, over the "
                                f"quota of {limit_bytes} bytes and {limit_entries} entries")


def _kill_session(pid: int) -> None:
    # The candidate leads its own session and process group: this takes every process it started
    # (except one that made itself a new session; the container's end takes that one).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _hand_over(checkpoint: Path) -> None:
    """Make the candidate's checkpoint readable by the eval stage's scorer, whatever mode the candidate gave it
    (a regular file only; the eval stage judges anything else)."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(checkpoint).st_mode):
            os.chmod(checkpoint, 0o644)


def _terminate(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)  # unwinds through run_train's `finally`, which kills the candidate's session


def run_train(candidate: Path, data_dir: Path, out_dir: Path) -> int:
    if (problem := split_problem(data_dir, "train")) is not None:
        print(f"refusing to train: {problem}", flush=True)
        return EXIT_WRONG_SPLIT
    try:
        rules = TimeRules.from_env(os.environ)
        identities = stage_identities(os.environ)
    except ValueError as exc:
        print(str(exc), flush=True)
        return EXIT_USAGE
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AUTORESEARCH_DATA_DIR": str(data_dir), "AUTORESEARCH_OUT_DIR": str(out_dir),
           "PYTHONUNBUFFERED": "1"}
    env.pop("AUTORESEARCH_EVAL_TOKENS", None)  # the candidate has no business with eval settings
    env.pop(PRIVSEP_ENV, None)
    # Compile caches: the candidate compiles into a private copy of the lane's shared cache (trainer.compile_cache).
    shared_cache = env.pop(compile_cache.CACHE_ENV, None)
    publishing = env.pop(compile_cache.PUBLISH_ENV, "") == "1"
    cache_dir, cache_env, cache_note = compile_cache.private_cache(shared_cache)
    env.update(cache_env)
    print(cache_note, flush=True)
    # Split identities (trainer.privsep): the candidate runs as the model uid, this harness stays the container's
    # root, out of its reach: it can neither signal it, nor read or patch its memory (its clock, its exit status).
    candidate_id: dict[str, Any] = {}
    if identities is not None:
        compile_cache.open_to_all(cache_dir)
        candidate_id = identities.model_popen()
    previous_handler = signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, str(candidate)], cwd=out_dir, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **candidate_id)
    assert child.stdout is not None
    relay = OutputRelay(child.stdout)
    relay.start()
    try:
        # The stage ends when the candidate PROCESS exits, not when its output pipe closes.
        returncode, quota_problem = _wait_within_quota(child, out_dir, _out_quota(os.environ))
        ended = time.monotonic()
        wall_seconds = ended - started
    finally:
        _kill_session(child.pid)
        relay.stop()
        child.stdout.close()
        signal.signal(signal.SIGTERM, previous_handler)
    exit_code = returncode if returncode >= 0 else 128 - returncode
    checkpoint = out_dir / CHECKPOINT_NAME
    if identities is not None:
        _hand_over(checkpoint)
    if publishing and exit_code == 0 and checkpoint.exists():
        print(compile_cache.publish(cache_dir, out_dir / compile_cache.PUBLISHED_DIR), flush=True)
    treewalk.remove_tree(cache_dir)  # candidate-made: iterative, any depth (shutil.rmtree recurses)
    summary = parse_summary(bytes(relay.tail).decode("utf-8", errors="replace"))
    phases = split_phases(started, relay.marks.get(TRAINING_STARTS), relay.marks.get(EXPORT_STARTS), ended)
    over_budget = rules.verdict(phases) if rules is not None else ""
    write_json(out_dir / "train.json", {"wall_seconds": round(wall_seconds, 3), "exit_code": exit_code,
                                        "checkpoint": checkpoint.exists(), "summary": summary, "phases": phases,
                                        "over_budget": over_budget, "out_quota": quota_problem})
    if quota_problem:
        print(f"out dir over quota: {quota_problem}", flush=True)
        return EXIT_OUT_QUOTA
    if over_budget and exit_code == 0:
        # The exit status is the harness's own channel to the daemon (train.json sits in a folder the
        # candidate could write): over budget is never scored, whatever the candidate wrote.
        print(f"over budget: {over_budget}", flush=True)
        return EXIT_OVER_BUDGET
    if exit_code != 0:
        print(f"candidate exited with status {exit_code} after {wall_seconds:.1f} s", flush=True)
        return exit_code
    if not checkpoint.exists():
        print(f"candidate exited cleanly but wrote no {checkpoint}: it must call export_checkpoint", flush=True)
        return EXIT_NO_CHECKPOINT
    print(f"train stage done in {wall_seconds:.1f} s", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m trainer.harness", description=__doc__.splitlines()[0])
    stages = parser.add_subparsers(dest="stage", required=True)
    train = stages.add_parser("train", help="run a candidate train.py on the TRAIN split")
    train.add_argument("--candidate", type=Path, required=True)
    train.add_argument("--data", type=Path, required=True)
    train.add_argument("--out", type=Path, required=True)
    evaluate = stages.add_parser("eval", help="score a checkpoint on the VAL split")
    evaluate.add_argument("--checkpoint", type=Path, required=True)
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if (no_cuda := stage_start(os.environ)) is not None:  # trainer.device_check: never a silent CPU run
        print(f"no CUDA device on a GPU lane: {no_cuda}", flush=True)
        return EXIT_NO_CUDA
    if args.stage == "train":
        if not args.candidate.is_file():
            print(f"candidate {args.candidate} does not exist: mount the candidate's train.py there", flush=True)
            return EXIT_USAGE
        return run_train(args.candidate.resolve(), args.data.resolve(), args.out.resolve())
    from trainer.eval_stage import run_eval  # torch is imported only by the stage that needs it

    try:
        return run_eval(args.checkpoint.resolve(), args.data.resolve(), args.out.resolve())
    except DataError as exc:
        print(f"eval failed: {exc}", flush=True)
        return EXIT_CRASH


if __name__ == "__main__":
    exit_code = main()
    # The interpreter's last garbage collection walks all of torch's objects (about a second): skip it.
    gc.freeze()
    sys.exit(exit_code)
