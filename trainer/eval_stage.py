"""The trusted eval stage: score an exported checkpoint on the VAL split and write result.json.

No candidate code runs here: the checkpoint is a `torch.export` program. It must run on int64 tokens of
shape (B, SEQ_LEN) and return (B, SEQ_LEN, vocab) logits, pass the causality probe, and give a finite
val_bpb computed by prepare.py's `evaluate_bpb`. Called by `python3 -m trainer.harness eval`.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export.passes import move_to_device_pass

from trainer.harness import EXIT_USAGE, EXIT_WRONG_SPLIT, split_problem, write_json
from trainer.layout import sha256_file
from trainer.prepare import (
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

PROBE_TOLERANCE = 1e-3        # relative to the largest logit: exact on CPU, slack for GPU kernels
PROBE_ROWS = 2                # two rows: enough to see a model that mixes the rows of a batch


def causality_probe(model: torch.nn.Module, batch: torch.Tensor, vocab_size: int,
                    base: torch.Tensor | None = None) -> str:
    """'passed', or why the model's logits at positions <= t depend on tokens after t (or on other rows).
    `base` may hold the model's logits for `batch` when the caller already has them."""
    generator = torch.Generator().manual_seed(1234)
    if base is None:
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


def eval_tokens_setting() -> int:
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
    if (problem := split_problem(data_dir, "val")) is not None:
        print(f"refusing to evaluate: {problem}", flush=True)
        return EXIT_WRONG_SPLIT
    try:
        max_tokens = eval_tokens_setting()
    except ValueError as exc:
        print(str(exc), flush=True)
        return EXIT_USAGE
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # Data problems are ours, not the candidate's: they crash the stage (non-zero exit, no result).
    meta = read_split_meta(data_dir)
    encoding = load_tokenizer(data_dir)
    data_sha256 = sha256_file(data_dir / "tokens.bin")
    if data_sha256 != meta.get("tokens_sha256"):
        raise DataError(f"{data_dir / 'tokens.bin'} does not match its checksum in meta.json: "
                        "the data is damaged; run `autoresearch prepare` again")
    window = eval_token_window(data_dir, max_tokens)
    result: dict[str, Any] = {"status": "invalid", "val_bpb": None, "eval_seconds": 0.0, "probe": "not run",
                              "checkpoint_sha256": sha256_file(checkpoint) if checkpoint.is_file() else "",
                              "data_sha256": data_sha256, "vocab_size": encoding.n_vocab, "num_params": 0, "error": ""}
    timings: dict[str, float] = {"data": time.monotonic() - started}
    try:
        result.update(_score_checkpoint(checkpoint, window, encoding.n_vocab, token_byte_lengths(encoding), device,
                                        timings))
    except DataError as exc:
        result["error"] = str(exc)
    result["eval_seconds"] = round(time.monotonic() - started, 3)
    write_json(out_dir / "result.json", result)
    outcome = f"val_bpb {result['val_bpb']:.6f}" if result["status"] == "ok" else f"invalid: {result['error']}"
    print(f"eval stage done in {result['eval_seconds']:.1f} s on {device} "
          f"({', '.join(f'{name} {seconds:.2f} s' for name, seconds in timings.items())}): {outcome}", flush=True)
    return 0


def _load_program(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The checkpoint as a callable module on `device`, and its parameter count."""
    program = load_checkpoint(checkpoint)
    num_params = sum(program.state_dict[name].numel() for name in program.graph_signature.parameters)
    if device.type != "cpu":
        # The graph records the device it was exported on (e.g. in tensor-metadata asserts), so moving the
        # module's weights alone is not enough: rewrite the whole program for the device.
        try:
            program = move_to_device_pass(program, device)
        except Exception as exc:  # a graph that cannot be moved is the candidate's problem
            raise DataError(f"the checkpoint cannot be moved to {device} ({type(exc).__name__}: {str(exc)[:200]}): "
                            "export with trainer.prepare.export_checkpoint") from None
    return program.module(), num_params


def _score_checkpoint(checkpoint: Path, window: np.ndarray, vocab_size: int, token_bytes: torch.Tensor,
                      device: torch.device, timings: dict[str, float]) -> dict[str, Any]:
    """status/val_bpb/probe/num_params/error for one checkpoint; DataError when it is unusable.
    Adds the seconds of each step to `timings`."""
    clock = time.monotonic()
    model, num_params = _load_program(checkpoint, device)
    timings["load"], clock = time.monotonic() - clock, time.monotonic()
    rows = torch.as_tensor(window[: PROBE_ROWS * SEQ_LEN], dtype=torch.int64)
    probe_batch = rows[: (len(rows) // SEQ_LEN) * SEQ_LEN].view(-1, SEQ_LEN).to(device)
    with torch.no_grad():
        # Token 0 exists in every vocabulary, so a model for another vocabulary still runs and shows its size.
        for inputs in (torch.zeros_like(probe_batch[:1]), probe_batch):
            try:
                logits = model(inputs)
            except Exception as exc:  # any failure of the candidate's graph on the fixed input shape
                raise DataError(f"the checkpoint does not run on int64 tokens of shape {tuple(inputs.shape)} "
                                f"({type(exc).__name__}: {str(exc)[:200]}): export with trainer.prepare.export_checkpoint") from None
            expected = (*inputs.shape, vocab_size)
            if tuple(logits.shape) != expected:
                raise DataError(f"the checkpoint returns logits of shape {tuple(logits.shape)}, expected {expected}: it was "
                                f"trained for another vocabulary or shape; train on this data (vocab {vocab_size})")
        probe = causality_probe(model, probe_batch, vocab_size, base=logits)
        timings["probe"], clock = time.monotonic() - clock, time.monotonic()
        if probe != "passed":
            return {"status": "invalid", "probe": probe, "num_params": num_params,
                    "error": f"causality probe failed: {probe}"}
        val_bpb = evaluate_bpb(model, window, token_bytes, device=device)
        timings["bpb"] = time.monotonic() - clock
    if not math.isfinite(val_bpb):
        return {"status": "invalid", "probe": probe, "num_params": num_params, "error": f"val_bpb is {val_bpb}"}
    return {"status": "ok", "val_bpb": val_bpb, "probe": probe, "num_params": num_params}
