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
    EVAL_BATCH_SIZE,
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

PROBE_TOLERANCE = 1e-3        # absolute, in nats of log-probability: exact on CPU, slack for GPU kernels
PROBE_ROUNDS = 1              # forward passes with a fresh random cut in every row but one (16 cuts each)


def _log_probs(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    # Compared as log-probabilities: an offset added to all logits changes nothing the score sees, so it must
    # not widen the tolerance either.
    return torch.log_softmax(model(batch).float(), dim=-1)


def _random_ints(count: int, high: int, device: torch.device) -> torch.Tensor:
    """`count` ints in [0, high) from the OS's randomness: a checkpoint cannot know them in advance."""
    raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) % np.uint64(high)
    return torch.as_tensor(raw.astype(np.int64), device=device)


def causality_probe(model: torch.nn.Module, batch: torch.Tensor, vocab_size: int,
                    base: torch.Tensor | None = None) -> str:
    """'passed', or why the model's outputs at positions <= t depend on tokens after t (or on other rows).
    `batch` has the shape the scorer uses; in each round every row but one gets its own unpredictable cut
    and the remaining row, left whole, must not change at all. `base` may hold the logits for `batch`."""
    rows, seq_len = batch.shape
    base = _log_probs(model, batch) if base is None else torch.log_softmax(base.float(), dim=-1)
    positions = torch.arange(seq_len, device=batch.device)
    for _ in range(PROBE_ROUNDS):
        cuts = _random_ints(rows, seq_len - 1, batch.device)                    # one cut t per row, t < T-1
        keep = int(_random_ints(1, rows, batch.device).item()) if rows > 1 else -1
        if keep >= 0:
            cuts[keep] = seq_len - 1                                            # this row keeps all its tokens
        after = positions[None, :] > cuts[:, None]
        changed = torch.where(after, _random_ints(rows * seq_len, vocab_size, batch.device).view(rows, seq_len),
                              batch)
        drift = (_log_probs(model, changed) - base).abs()
        drift = torch.where(after[..., None], torch.zeros_like(drift), drift)
        drift = torch.where(torch.isnan(drift), torch.full_like(drift, math.inf), drift)
        per_row = drift.amax(dim=(1, 2))
        if keep >= 0 and not per_row[keep].item() <= PROBE_TOLERANCE:
            return (f"log-probabilities of one row changed by {per_row[keep].item():.3g} when only the other rows "
                    f"of the batch changed (batch of {rows})")
        row = int(per_row.argmax().item())
        if not per_row[row].item() <= PROBE_TOLERANCE:
            t = int(cuts[row].item())
            return (f"log-probabilities at positions <= {t} changed by {per_row[row].item():.3g} when only tokens "
                    f"after {t} changed (batch of {rows})")
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
    # The probe runs at the full scoring shape (EVAL_BATCH_SIZE, SEQ_LEN) and at every other batch shape the
    # scorer will use on this window (a smaller window, the remainder batch); short windows repeat their rows.
    rows = (len(window) - 1) // SEQ_LEN
    text = torch.as_tensor(window[: rows * SEQ_LEN], dtype=torch.int64).view(rows, SEQ_LEN)
    sizes = sorted({EVAL_BATCH_SIZE, min(rows, EVAL_BATCH_SIZE), rows % EVAL_BATCH_SIZE} - {0}, reverse=True)
    probe_batches = [text.repeat((size + rows - 1) // rows, 1)[:size].to(device) for size in sizes]
    with torch.no_grad():
        # Token 0 exists in every vocabulary, so a model for another vocabulary still runs and shows its size.
        for inputs in (torch.zeros_like(probe_batches[0][:1]), probe_batches[0]):
            try:
                logits = model(inputs)
            except Exception as exc:  # any failure of the candidate's graph on the fixed input shape
                raise DataError(f"the checkpoint does not run on int64 tokens of shape {tuple(inputs.shape)} "
                                f"({type(exc).__name__}: {str(exc)[:200]}): export with trainer.prepare.export_checkpoint") from None
            expected = (*inputs.shape, vocab_size)
            if tuple(logits.shape) != expected:
                raise DataError(f"the checkpoint returns logits of shape {tuple(logits.shape)}, expected {expected}: it was "
                                f"trained for another vocabulary or shape; train on this data (vocab {vocab_size})")
        probe = "passed"
        for probe_batch in probe_batches:
            first = probe_batch is probe_batches[0]
            if (probe := causality_probe(model, probe_batch, vocab_size, logits if first else None)) != "passed":
                break
        timings["probe"], clock = time.monotonic() - clock, time.monotonic()
        if probe != "passed":
            return {"status": "invalid", "probe": probe, "num_params": num_params,
                    "error": f"causality probe failed: {probe}"}
        val_bpb = evaluate_bpb(model, window, token_bytes, device=device)
        timings["bpb"] = time.monotonic() - clock
    if not math.isfinite(val_bpb):
        return {"status": "invalid", "probe": probe, "num_params": num_params, "error": f"val_bpb is {val_bpb}"}
    return {"status": "ok", "val_bpb": val_bpb, "probe": probe, "num_params": num_params}
