"""Trusted entrypoint of the trainer container: the `train` and `eval` stages.

    python3 -m trainer.harness train --candidate /candidate/train.py --data /data --out /out
    python3 -m trainer.harness eval --checkpoint /checkpoint/model.pt2 --data /data --out /out

train runs the candidate in a child process in its own session (with AUTORESEARCH_DATA_DIR /
AUTORESEARCH_OUT_DIR set), waits for that process to exit, kills whatever it left behind, measures its wall
time itself and writes train.json. eval (trainer.eval_stage) loads the exported checkpoint (no candidate
code runs), probes it for causality, computes val_bpb with prepare.py's code and writes result.json.
The numbers a candidate prints are informational only. This module imports no torch: the train stage
does not need it, and the candidate pays for its own import.
Exit codes: 0 ok (eval: result.json written, even for `invalid`), 3 wrong split visible,
2 bad arguments, 4 no checkpoint after a clean train run, 1 eval crashed; train otherwise passes the
candidate's own exit status on.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import gc
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any

from trainer.layout import CHECKPOINT_NAME, DataError, read_split_meta

EXIT_CRASH, EXIT_USAGE, EXIT_WRONG_SPLIT, EXIT_NO_CHECKPOINT = 1, 2, 3, 4
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


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


def _kill_session(pid: int) -> None:
    # The candidate leads its own session and process group: this takes every process it started
    # (except one that made itself a new session; the container's end takes that one).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _terminate(signum: int, frame: FrameType | None) -> None:
    sys.exit(128 + signum)  # unwinds through run_train's `finally`, which kills the candidate's session


def run_train(candidate: Path, data_dir: Path, out_dir: Path) -> int:
    if (problem := split_problem(data_dir, "train")) is not None:
        print(f"refusing to train: {problem}", flush=True)
        return EXIT_WRONG_SPLIT
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AUTORESEARCH_DATA_DIR": str(data_dir), "AUTORESEARCH_OUT_DIR": str(out_dir),
           "PYTHONUNBUFFERED": "1"}
    env.pop("AUTORESEARCH_EVAL_TOKENS", None)  # the candidate has no business with eval settings
    previous_handler = signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, str(candidate)], cwd=out_dir, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    assert child.stdout is not None
    relay = OutputRelay(child.stdout)
    relay.start()
    try:
        # The stage ends when the candidate PROCESS exits, not when its output pipe closes.
        returncode = child.wait()
        wall_seconds = time.monotonic() - started
    finally:
        _kill_session(child.pid)
        relay.stop()
        child.stdout.close()
        signal.signal(signal.SIGTERM, previous_handler)
    exit_code = returncode if returncode >= 0 else 128 - returncode
    checkpoint = out_dir / CHECKPOINT_NAME
    summary = parse_summary(bytes(relay.tail).decode("utf-8", errors="replace"))
    write_json(out_dir / "train.json", {"wall_seconds": round(wall_seconds, 3), "exit_code": exit_code,
                                        "checkpoint": checkpoint.exists(), "summary": summary})
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
