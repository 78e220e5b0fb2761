"""Trusted entrypoint of the trainer container: the `train` and `eval` stages.

    python3 -m trainer.harness train --candidate /candidate/train.py --data /data --out /out
    python3 -m trainer.harness eval --checkpoint /checkpoint/model.pt2 --data /data --out /out

train runs the candidate in a child process (with AUTORESEARCH_DATA_DIR / AUTORESEARCH_OUT_DIR set),
measures its wall time itself and writes train.json. eval loads the exported checkpoint (no candidate
code runs), probes it for causality, computes val_bpb with prepare.py's code and writes result.json.
The numbers a candidate prints are informational only.
Exit codes: 0 ok (eval: result.json written, even for `invalid`), 3 wrong split visible,
2 bad arguments, 4 no checkpoint after a clean train run, 1 eval crashed; train otherwise passes the
candidate's own exit status on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from trainer.prepare import (
    CHECKPOINT_NAME,
    EVAL_TOKENS,
    SEQ_LEN,
    DataError,
    eval_token_window,
    evaluate_bpb,
    load_checkpoint,
    load_tokenizer,
    read_split_meta,
    token_byte_lengths,
)

EXIT_CRASH, EXIT_USAGE, EXIT_WRONG_SPLIT, EXIT_NO_CHECKPOINT = 1, 2, 3, 4
OUTPUT_TAIL_LINES = 400       # of the candidate's output kept for the summary block
PROBE_TOLERANCE = 1e-3        # relative to the largest logit: exact on CPU, slack for GPU kernels


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


def _split_problem(data_dir: Path, wanted: str) -> str | None:
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# train stage

def run_train(candidate: Path, data_dir: Path, out_dir: Path) -> int:
    if (problem := _split_problem(data_dir, "train")) is not None:
        print(f"refusing to train: {problem}", flush=True)
        return EXIT_WRONG_SPLIT
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AUTORESEARCH_DATA_DIR": str(data_dir), "AUTORESEARCH_OUT_DIR": str(out_dir),
           "PYTHONUNBUFFERED": "1"}
    env.pop("AUTORESEARCH_EVAL_TOKENS", None)  # the candidate has no business with eval settings
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    started = time.monotonic()
    with subprocess.Popen([sys.executable, str(candidate)], cwd=out_dir, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1) as child:
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
    wall_seconds = time.monotonic() - started
    exit_code = child.returncode if child.returncode >= 0 else 128 - child.returncode
    checkpoint = out_dir / CHECKPOINT_NAME
    _write_json(out_dir / "train.json", {"wall_seconds": round(wall_seconds, 3), "exit_code": exit_code,
                                         "checkpoint": checkpoint.exists(), "summary": parse_summary("".join(tail))})
    if exit_code != 0:
        print(f"candidate exited with status {exit_code} after {wall_seconds:.1f} s", flush=True)
        return exit_code
    if not checkpoint.exists():
        print(f"candidate exited cleanly but wrote no {checkpoint}: it must call export_checkpoint", flush=True)
        return EXIT_NO_CHECKPOINT
    print(f"train stage done in {wall_seconds:.1f} s", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# eval stage

def causality_probe(model: torch.nn.Module, batch: torch.Tensor, vocab_size: int) -> str:
    """'passed', or why the model's logits at positions <= t depend on tokens after t (or on other rows)."""
    generator = torch.Generator().manual_seed(1234)
    base = model(batch)
    scale = 1.0 + base.abs().max().item()
    seq_len = batch.size(1)
    cut_points = sorted({0, seq_len // 3, seq_len // 2, seq_len - 2,
                         int(torch.randint(1, seq_len - 1, (1,), generator=generator))})
    for t in cut_points:
        changed = batch.clone()
        changed[:, t + 1:] = torch.randint(0, vocab_size, changed[:, t + 1:].shape, generator=generator).to(batch.device)
        drift = (model(changed)[:, :t + 1] - base[:, :t + 1]).abs().max().item()
        if not drift <= PROBE_TOLERANCE * scale:
            return f"logits at positions <= {t} changed by {drift:.3g} when only tokens after {t} changed"
    if batch.size(0) > 1:
        others = batch.clone()
        others[1:] = torch.randint(0, vocab_size, others[1:].shape, generator=generator).to(batch.device)
        drift = (model(others)[0] - base[0]).abs().max().item()
        if not drift <= PROBE_TOLERANCE * scale:
            return f"logits of one row changed by {drift:.3g} when only the other rows of the batch changed"
    return "passed"


def _eval_tokens_setting() -> int:
    raw = os.environ.get("AUTORESEARCH_EVAL_TOKENS", "").strip()
    if not raw:
        return EVAL_TOKENS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"AUTORESEARCH_EVAL_TOKENS={raw!r} is not a positive integer: unset it or give a token count")
    return value


def run_eval(checkpoint: Path, data_dir: Path, out_dir: Path) -> int:
    if (problem := _split_problem(data_dir, "val")) is not None:
        print(f"refusing to evaluate: {problem}", flush=True)
        return EXIT_WRONG_SPLIT
    try:
        max_tokens = _eval_tokens_setting()
    except ValueError as exc:
        print(str(exc), flush=True)
        return EXIT_USAGE
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # Data problems are ours, not the candidate's: they crash the stage (non-zero exit, no result).
    meta = read_split_meta(data_dir)
    encoding = load_tokenizer(data_dir)
    data_sha256 = _sha256(data_dir / "tokens.bin")
    if data_sha256 != meta.get("tokens_sha256"):
        raise DataError(f"{data_dir / 'tokens.bin'} does not match its checksum in meta.json: "
                        "the data is damaged; run `autoresearch prepare` again")
    window = eval_token_window(data_dir, max_tokens)
    result: dict[str, Any] = {"status": "invalid", "val_bpb": None, "eval_seconds": 0.0, "probe": "not run",
                              "checkpoint_sha256": _sha256(checkpoint) if checkpoint.is_file() else "",
                              "data_sha256": data_sha256, "vocab_size": encoding.n_vocab, "num_params": 0, "error": ""}
    try:
        result.update(_score_checkpoint(checkpoint, window, encoding.n_vocab, token_byte_lengths(encoding), device))
    except DataError as exc:
        result["error"] = str(exc)
    result["eval_seconds"] = round(time.monotonic() - started, 3)
    _write_json(out_dir / "result.json", result)
    outcome = f"val_bpb {result['val_bpb']:.6f}" if result["status"] == "ok" else f"invalid: {result['error']}"
    print(f"eval stage done in {result['eval_seconds']:.1f} s: {outcome}", flush=True)
    return 0


def _score_checkpoint(checkpoint: Path, window: Any, vocab_size: int, token_bytes: torch.Tensor,
                      device: torch.device) -> dict[str, Any]:
    """status/val_bpb/probe/num_params/error for one checkpoint; DataError when it is unusable."""
    program = load_checkpoint(checkpoint)
    num_params = sum(program.state_dict[name].numel() for name in program.graph_signature.parameters)
    model = program.module().to(device)
    rows = torch.as_tensor(window[: 2 * SEQ_LEN], dtype=torch.int64)
    probe_batch = rows[: (len(rows) // SEQ_LEN) * SEQ_LEN].view(-1, SEQ_LEN).to(device)
    with torch.no_grad():
        # Token 0 exists in every vocabulary, so a model for another vocabulary still runs and shows its size.
        for inputs in (torch.zeros_like(probe_batch), probe_batch):
            try:
                logits = model(inputs)
            except Exception as exc:  # any failure of the candidate's graph on the fixed input shape
                raise DataError(f"the checkpoint does not run on int64 tokens of shape {tuple(inputs.shape)} "
                                f"({type(exc).__name__}: {str(exc)[:200]}): export with trainer.prepare.export_checkpoint") from None
            expected = (*inputs.shape, vocab_size)
            if tuple(logits.shape) != expected:
                raise DataError(f"the checkpoint returns logits of shape {tuple(logits.shape)}, expected {expected}: it was "
                                f"trained for another vocabulary or shape; train on this data (vocab {vocab_size})")
        probe = causality_probe(model, probe_batch, vocab_size)
        if probe != "passed":
            return {"status": "invalid", "probe": probe, "num_params": num_params,
                    "error": f"causality probe failed: {probe}"}
        val_bpb = evaluate_bpb(model, window, token_bytes, device=device)
    if not math.isfinite(val_bpb):
        return {"status": "invalid", "probe": probe, "num_params": num_params, "error": f"val_bpb is {val_bpb}"}
    return {"status": "ok", "val_bpb": val_bpb, "probe": probe, "num_params": num_params}


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
    try:
        return run_eval(args.checkpoint.resolve(), args.data.resolve(), args.out.resolve())
    except DataError as exc:
        print(f"eval failed: {exc}", flush=True)
        return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
