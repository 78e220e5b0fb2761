"""Trusted entrypoint of the trainer container: the `train` and `eval` stages.

    python3 -m trainer.harness train --candidate /candidate/train.py --data /data --out /out
    python3 -m trainer.harness eval --checkpoint /checkpoint/model.pt2 --data /data --out /out

train runs the candidate in a child process in its own session (with AUTORESEARCH_DATA_DIR /
AUTORESEARCH_OUT_DIR set), waits for that process to exit or for the stage's deadline, kills every process of the
candidate, fixes its checkpoint, measures its wall time itself and writes train.json. eval (trainer.eval_stage)
loads the exported checkpoint (no candidate code runs), probes it for causality, computes val_bpb with prepare.py's
code and writes result.json.
Under the sandbox (AUTORESEARCH_PRIVSEP, trainer.privsep) the candidate runs as its own uid while this harness
stays the container's root, so the candidate can neither signal it nor touch its memory, its clock or its
report; the candidate writes a kernel-sized tmpfs (AUTORESEARCH_WORK_DIR, its quota) and the out dir is the
harness's alone: once every process of the candidate's uid is dead, the harness copies the checkpoint there.
The numbers a candidate prints are informational only. This module imports no torch: the train stage
does not need it, and the candidate pays for its own import.
The harness owns time (trainer.clock): one clock from the spawn, a hard deadline at compile allowance + budget +
slack; a candidate still running then is killed and the stage exits 5 (the daemon records `timeout`, never a score).
Exit codes: 0 ok (eval: result.json written, even for `invalid`), 3 wrong split visible,
2 bad arguments, 4 no checkpoint after a clean train run, 5 over budget, 6 out dir over its total quota
(the candidate is killed when it passes it), 1 eval crashed or a candidate process outlived its kills; train otherwise passes the candidate's own
exit status on.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import gc
import json
import math
import os
import secrets
import select
import shutil
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
from trainer.clock import DEADLINE_ENV, TimeRules
from trainer.device_check import EXIT_NO_CUDA, stage_start
from trainer.layout import CHECKPOINT_NAME, WORK_ENV, DataError, read_split_meta
from trainer.privsep import (
    KILL_ATTEMPTS,
    PRIVSEP_ENV,
    Identities,
    become_subreaper,
    kill_uid,
    reap_orphans,
    stage_identities,
)

EXIT_CRASH, EXIT_USAGE, EXIT_WRONG_SPLIT, EXIT_NO_CHECKPOINT, EXIT_OVER_BUDGET = 1, 2, 3, 4, 5
EXIT_OUT_QUOTA = 6
OUT_QUOTA_BYTES = 16 * 1024**3 # the out dir in total (each file is also capped by the sandbox's fsize limit)
OUT_QUOTA_ENTRIES = 10_000
QUOTA_POLL_SECONDS = 0.5
WORK_FULL_BYTES = 1024**2      # a work dir with less free is full (the candidate's failure is then its quota's)
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
    """(bytes, entries) under `out_dir` while the candidate may still change it: trainer.treewalk's walk over
    folder descriptors (no link followed, locked folders reopened without following a swapped-in link, any
    depth); stops counting past max_entries (then entries = max_entries + 1)."""
    walk = treewalk.measure(out_dir, treewalk.Bounds(max_depth=1 << 30, max_entries=max_entries,
                                                     max_name_bytes=1 << 30, max_path_bytes=1 << 62), unlock=True)
    return walk.bytes, walk.entries + (1 if walk.problem else 0)


@dataclass
class StageEnd:
    """Why the candidate's run ended: its exit, the out dir's quota or the stage's hard deadline."""

    returncode: int | None = None  # None: it was still running when the harness stopped waiting
    quota_problem: str = ""
    past_deadline: bool = False


def _wait(child: subprocess.Popen[bytes], out_dir: Path, quota: tuple[int, int], deadline: float) -> StageEnd:
    """Wait for the candidate's exit, at most until `deadline` (monotonic) or until its out dir passes the quota."""
    limit_bytes, limit_entries = quota
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return StageEnd(past_deadline=True)
        try:
            return StageEnd(returncode=child.wait(timeout=min(QUOTA_POLL_SECONDS, remaining)))
        except subprocess.TimeoutExpired:
            pass
        used, entries = out_dir_usage(out_dir, limit_entries)
        if used > limit_bytes or entries > limit_entries:
            return StageEnd(quota_problem=f"the candidate wrote {used} bytes in {entries} entries under its out dir, "
                                          f"over the quota of {limit_bytes} bytes and {limit_entries} entries")


def _kill_session(pid: int) -> None:
    # The candidate leads its own session and process group: this takes every process it started (except one
    # that made itself a new session: only the uid-wide kill of a split stage takes that one).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _end_candidate(child: subprocess.Popen[bytes], identities: Identities | None) -> str:
    """Kill everything the candidate runs and collect its exit status; '' or why something may still run."""
    problem = ""
    if identities is not None and not kill_uid(identities.model_uid):
        problem = f"processes of the candidate's uid {identities.model_uid} survived {KILL_ATTEMPTS} kills"
    _kill_session(child.pid)
    child.wait()
    if identities is not None:
        reap_orphans()
    return problem


def _seal(out_dir: Path) -> None:
    """The result dir becomes the harness's alone (root's, mode 0755) before the candidate starts: whatever the
    host's ownership, the candidate's uid can read it but neither write nor chmod it."""
    os.chown(out_dir, 0, 0)
    os.chmod(out_dir, 0o755)


def fix_checkpoint(work_dir: Path, out_dir: Path) -> bool:
    """Copy the (dead) candidate's checkpoint, a regular file only, from its work dir into the result dir, where the
    eval stage reads it. False when there is none, it is not a regular file, or it cannot be copied."""
    target = out_dir / CHECKPOINT_NAME
    try:
        source_fd = os.open(work_dir / CHECKPOINT_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    if not stat.S_ISREG(os.fstat(source_fd).st_mode):
        os.close(source_fd)
        return False
    tmp = out_dir / f".{CHECKPOINT_NAME}.{secrets.token_hex(8)}"
    with os.fdopen(source_fd, "rb") as source:
        try:
            target_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(target_fd, "wb") as copy:
                shutil.copyfileobj(source, copy, 1 << 20)
            os.replace(tmp, target)
        except OSError as exc:  # over the file-size limit, or the result dir is full
            print(f"the checkpoint could not be copied out of the candidate's folder: {exc}", flush=True)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
    return True


def work_dir_full(work_dir: Path) -> str:
    """Why the candidate's work dir (a tmpfs whose size is its quota) is full, or '' (it is not, or not a mount)."""
    try:
        info = os.statvfs(work_dir)
    except OSError:
        return ""
    if (info.f_blocks and info.f_bavail * info.f_frsize < WORK_FULL_BYTES) or (info.f_files and info.f_favail == 0):
        return (f"the candidate filled its work dir, {info.f_blocks * info.f_frsize} bytes and {info.f_files} "
                "entries (its quota, enforced by the kernel; files unlinked while open count)")
    return ""


def _hand_over(checkpoint: Path) -> None:
    """Make the candidate's checkpoint readable by the eval stage's scorer, whatever mode the candidate gave it
    (a regular file only; the eval stage judges anything else)."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(checkpoint).st_mode):
            os.chmod(checkpoint, 0o644)


def _terminate(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)  # unwinds through run_train's `finally`, which kills the candidate


def _candidate_dirs(out_dir: Path, identities: Identities | None) -> tuple[Path, Path | None]:
    """(the folder the candidate writes, the kernel-sized work dir or None). With a work dir (a sized tmpfs the
    sandbox mounts and names in WORK_ENV, only in a split stage) the candidate writes there and the out dir
    becomes the harness's; without one (local backend, tests) the candidate writes the out dir itself."""
    raw = os.environ.get(WORK_ENV, "").strip()
    if not raw or identities is None:
        return out_dir, None
    work_dir = Path(raw)
    work_dir.mkdir(parents=True, exist_ok=True)
    _seal(out_dir)
    return work_dir, work_dir


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
    candidate_out, work_dir = _candidate_dirs(out_dir, identities)
    env = {**os.environ, "AUTORESEARCH_DATA_DIR": str(data_dir), "AUTORESEARCH_OUT_DIR": str(candidate_out),
           "PYTHONUNBUFFERED": "1"}
    for private in ("AUTORESEARCH_EVAL_TOKENS", PRIVSEP_ENV, WORK_ENV, DEADLINE_ENV):
        env.pop(private, None)  # eval settings and the harness's own wiring are none of the candidate's business
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
        become_subreaper()
    previous_handler = signal.signal(signal.SIGTERM, _terminate)
    # The one clock (trainer.clock): it starts at the spawn and nothing the candidate does moves it.
    started = time.monotonic()
    hard_deadline = started + rules.hard_s if rules is not None else math.inf
    if rules is not None:
        env[DEADLINE_ENV] = repr(started + rules.target_s)
    child = subprocess.Popen([sys.executable, str(candidate)], cwd=candidate_out, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **candidate_id)
    assert child.stdout is not None
    relay = OutputRelay(child.stdout)
    relay.start()
    end = StageEnd()
    try:
        # The stage ends when the candidate PROCESS exits (or at the deadline), not when its output pipe closes.
        end = _wait(child, candidate_out, _out_quota(os.environ), hard_deadline)
        ended = time.monotonic()
        if work_dir is not None and end.returncode not in (None, 0) and not end.quota_problem:
            # A failure with the quota full is the quota's; measured before the kill frees files held open.
            end.quota_problem = work_dir_full(work_dir)
    finally:
        # Every process of the candidate dies before anything else: nothing it left runs beside what follows.
        kill_problem = _end_candidate(child, identities)
        relay.stop()
        child.stdout.close()
        signal.signal(signal.SIGTERM, previous_handler)
    wall_seconds = ended - started
    returncode = end.returncode if end.returncode is not None else child.returncode
    exit_code = returncode if returncode >= 0 else 128 - returncode
    checkpoint = out_dir / CHECKPOINT_NAME
    if kill_problem:
        print(f"refusing to score: {kill_problem}", flush=True)
        return EXIT_CRASH
    # The checkpoint is fixed only now, with the candidate dead: what the eval stage reads cannot change any more.
    has_checkpoint = fix_checkpoint(work_dir, out_dir) if work_dir is not None else checkpoint.exists()
    if identities is not None:
        _hand_over(checkpoint)
    if publishing and exit_code == 0 and has_checkpoint and not end.past_deadline:
        print(compile_cache.publish(cache_dir, out_dir / compile_cache.PUBLISHED_DIR), flush=True)
    treewalk.remove_tree(cache_dir)  # candidate-made: iterative, any depth (shutil.rmtree recurses)
    summary = parse_summary(bytes(relay.tail).decode("utf-8", errors="replace"))
    over_budget = (f"the candidate was still running at the stage's deadline ({rules.describe()})"
                   if end.past_deadline and rules is not None else "")
    write_json(out_dir / "train.json", {"wall_seconds": round(wall_seconds, 3), "exit_code": exit_code,
                                        "checkpoint": has_checkpoint, "summary": summary,
                                        "deadline_seconds": round(rules.hard_s, 3) if rules is not None else None,
                                        "over_budget": over_budget, "out_quota": end.quota_problem})
    if end.quota_problem:
        print(f"out dir over quota: {end.quota_problem}", flush=True)
        return EXIT_OUT_QUOTA
    if over_budget:
        # The exit status is the harness's own channel to the daemon: over budget is never scored.
        print(f"over budget: {over_budget}", flush=True)
        return EXIT_OVER_BUDGET
    if exit_code != 0:
        print(f"candidate exited with status {exit_code} after {wall_seconds:.1f} s", flush=True)
        return exit_code
    if not has_checkpoint:
        print(f"candidate exited cleanly but left no regular {CHECKPOINT_NAME}: it must call export_checkpoint",
              flush=True)
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
