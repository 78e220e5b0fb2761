"""The trusted eval stage (the scorer): score an exported checkpoint on the VAL split and write result.json.

The candidate's program never runs in this process. It is a `torch.export` archive, validated here by
allow-list (trainer.checkpoint_check), then loaded and run by a separate model process (trainer.model_process,
trainer.inference) that under the sandbox has its own uid and cannot read the val split nor write the out dir
(trainer.privsep); it gets the input rows of each batch through shared memory and returns their logits. The
program must run on int64 tokens of shape (B, T) and return (B, T, vocab) logits, T = trainer.prepare.
scoring_seq_len() of this stage's own (daemon-set) preset and device.
The rows are eval_token_window's: each starts at a document's BOS. Scoring visits them in a random order; every scoring batch
has a probe twin of the same shape (its rows re-ordered, each cut at an unpredictable position and the rest
replaced), the two run in a random order through the same call, and any drift of the log-probabilities the
cut must not affect makes the result `invalid`. The randomness, the targets and the sums stay here.
val_bpb is computed as in prepare.py's `evaluate_bpb`. Called by `python3 -m trainer.harness eval`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.checkpoint_check import UnsafeCheckpoint
from trainer.harness import EXIT_USAGE, EXIT_WRONG_SPLIT, split_problem, write_json
from trainer.layout import CHECKPOINT_NAME, sha256_file
from trainer.model_process import ModelCallError, ModelProcess
from trainer.prepare import (
    EVAL_BATCH_SIZE,
    EVAL_TOKENS,
    DataError,
    check_checkpoint_archive,
    eval_token_window,
    load_tokenizer,
    read_split_meta,
    row_pairs,
    scoring_seq_len,
    token_byte_lengths,
)
from trainer.privsep import PRIVSEP_ENV, become, stage_identities
from trainer.probe_power import EXIT_PROBE_POWER, probe_power_verdict

PROBE_TOLERANCE = 1e-3        # absolute, in nats of log-probability: exact on CPU, slack for GPU kernels
FULL_ROW_SHARE = 4            # one probe row in this many (on average) keeps all its tokens: last position checked


def _random_ints(count: int, high: int) -> torch.Tensor:
    """`count` ints in [0, high) from the OS's randomness: a checkpoint cannot know them in advance."""
    raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) % np.uint64(high)
    return torch.as_tensor(raw.astype(np.int64))


def _random_permutation(count: int) -> torch.Tensor:
    return torch.argsort(_random_ints(count, 2**62))


def probe_batch(batch: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probe twin of a scoring batch: its rows in another random order, each row's tokens from an
    unpredictable cut k on replaced by random tokens. Returns (probe, order, cuts): probe row i is scoring
    row order[i], and its positions < cuts[i] must give the same log-probabilities as in the scoring pass.
    k is uniform over [0, T) (0: the whole row changes, column 0 included), or T (nothing in the row
    changes: every position is checked, the last one included) for one row in FULL_ROW_SHARE on average."""
    rows, seq_len = batch.shape
    order = _random_permutation(rows)
    cuts = _random_ints(rows, seq_len)
    cuts = torch.where(_random_ints(rows, FULL_ROW_SHARE) == 0, torch.full_like(cuts, seq_len), cuts)
    replaced = torch.arange(seq_len)[None, :] >= cuts[:, None]
    noise = _random_ints(rows * seq_len, vocab_size).view(rows, seq_len)
    probe = torch.where(replaced.to(batch.device), noise.to(batch.device), batch[order.to(batch.device)])
    return probe, order, cuts


def probe_drift(scored: torch.Tensor, probed: torch.Tensor, order: torch.Tensor, cuts: torch.Tensor) -> str:
    """'passed', or how the probe's log-probabilities at checked positions differ from the scoring pass."""
    rows, seq_len, _ = scored.shape
    for i in range(rows):  # row by row: a (T, V) difference at a time keeps the memory of one row
        k = int(cuts[i])
        if k == 0:
            continue
        difference = probed[i, :k] - scored[int(order[i]), :k]
        drift = difference.abs_().amax().item()
        if not drift <= PROBE_TOLERANCE:  # NaN fails too
            if k == seq_len:
                return (f"log-probabilities of a row changed by {drift:.3g} when only the other rows of the batch "
                        f"and their order changed (batch of {rows})")
            return (f"log-probabilities at positions <= {k - 1} changed by {drift:.3g} when only tokens after "
                    f"{k - 1} in the row or the other rows of the batch changed (batch of {rows})")
    return "passed"


def score_window(model: Callable[[torch.Tensor], torch.Tensor], window: np.ndarray, token_bytes: torch.Tensor,
                 vocab_size: int, device: torch.device) -> tuple[float, str]:
    """(val_bpb, probe verdict) for the window's rows (eval_token_window), scored in batches of EVAL_BATCH_SIZE
    rows in a random order.
    Every scoring batch gets a probe twin (probe_batch) of the same shape and dtype through the same call,
    and the two run in a random order; the first drift beyond PROBE_TOLERANCE ends the scoring."""
    inputs, targets = row_pairs(window)
    rows = len(inputs)
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    shuffled = _random_permutation(rows)
    for start in range(0, rows, EVAL_BATCH_SIZE):
        picked = shuffled[start:start + EVAL_BATCH_SIZE]
        x, y = inputs[picked].to(device), targets[picked].to(device)
        probe, order, cuts = probe_batch(x, vocab_size)
        if _random_ints(1, 2).item():
            scored = torch.log_softmax(model(x).float(), dim=-1)
            probed = torch.log_softmax(model(probe).float(), dim=-1)
        else:
            probed = torch.log_softmax(model(probe).float(), dim=-1)
            scored = torch.log_softmax(model(x).float(), dim=-1)
        if (verdict := probe_drift(scored, probed, order, cuts)) != "passed":
            return math.nan, verdict
        del probed
        nats = -scored.gather(-1, y[..., None]).squeeze(-1)
        nbytes = token_bytes[y]
        total_nats += torch.where(nbytes > 0, nats, torch.zeros_like(nats)).sum(dtype=torch.float64)
        total_bytes += nbytes.sum()
    if total_bytes.item() == 0:
        raise DataError("the evaluated tokens hold no bytes: the val split is empty or only special tokens")
    return float(total_nats.item() / (math.log(2) * total_bytes.item())), "passed"


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
    try:
        identities = stage_identities(os.environ)
    except ValueError as exc:
        print(str(exc), flush=True)
        return EXIT_USAGE
    # The model process starts first, from nothing: it inherits no data, and under the sandbox it runs as its
    # own uid while this process drops to the scorer's for good before it reads the val split (trainer.privsep).
    with ModelProcess(identities) as model:
        if identities is not None:
            become(identities.scorer_uid)
        return _evaluate(model, checkpoint, data_dir, out_dir)


def _evaluate(model: ModelProcess, checkpoint: Path, data_dir: Path, out_dir: Path) -> int:
    if (problem := split_problem(data_dir, "val")) is not None:
        print(f"refusing to evaluate: {problem}", flush=True)
        return EXIT_WRONG_SPLIT
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        max_tokens = eval_tokens_setting()
        seq_len = scoring_seq_len(os.environ.get("AUTORESEARCH_PRESET", ""), device.type == "cuda")
    except ValueError as exc:
        print(str(exc), flush=True)
        return EXIT_USAGE
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)

    # Data problems are ours, not the candidate's: they crash the stage (non-zero exit, no result).
    meta = read_split_meta(data_dir)
    encoding = load_tokenizer(data_dir)
    data_sha256 = sha256_file(data_dir / "tokens.bin")
    if data_sha256 != meta.get("tokens_sha256"):
        raise DataError(f"{data_dir / 'tokens.bin'} does not match its checksum in meta.json: "
                        "the data is damaged; run `autoresearch prepare` again")
    window = eval_token_window(data_dir, max_tokens, seq_len)
    power = probe_power_verdict(len(window), seq_len, encoding.n_vocab, os.environ)  # trainer.probe_power
    print(power.line, flush=True)
    if power.refused:
        return EXIT_PROBE_POWER
    result: dict[str, Any] = {"status": "invalid", "val_bpb": None, "eval_seconds": 0.0, "probe": "not run",
                              "checkpoint_sha256": _checkpoint_sha256(checkpoint),
                              "data_sha256": data_sha256, "vocab_size": encoding.n_vocab, "seq_len": seq_len,
                              "eval_rows": len(window), "num_params": 0, "error": "",
                              "model_process": "own uid" if os.environ.get(PRIVSEP_ENV) else "same uid"}
    result.update(power.record())
    timings: dict[str, float] = {"data": time.monotonic() - started}
    try:
        result.update(_score_checkpoint(model, checkpoint, window, encoding.n_vocab, token_byte_lengths(encoding),
                                        device, timings))
    except DataError as exc:
        result["error"] = str(exc)
    result["eval_seconds"] = round(time.monotonic() - started, 3)
    write_json(out_dir / "result.json", result)
    outcome = f"val_bpb {result['val_bpb']:.6f}" if result["status"] == "ok" else f"invalid: {result['error']}"
    print(f"eval stage done in {result['eval_seconds']:.1f} s on {device} "
          f"({', '.join(f'{name} {seconds:.2f} s' for name, seconds in timings.items())}): {outcome}", flush=True)
    return 0


def _checkpoint_sha256(checkpoint: Path) -> str:
    """The checkpoint's SHA-256, or '' when it is missing or unreadable (scoring then says why)."""
    try:
        return sha256_file(checkpoint) if checkpoint.is_file() else ""
    except OSError:
        return ""


def _load(model: ModelProcess, checkpoint: Path, seq_len: int, vocab_size: int) -> int:
    """Validate the checkpoint here (trusted), then have the model process load it; its parameter count."""
    if not checkpoint.is_file():
        raise DataError(f"checkpoint {checkpoint} is missing: the train stage must write {CHECKPOINT_NAME}")
    try:
        check_checkpoint_archive(checkpoint)  # an unreadable file is a DataError here, before any copy
    except UnsafeCheckpoint as exc:
        raise DataError(f"checkpoint {checkpoint} is refused as unsafe: {exc}; save it with "
                        "trainer.prepare.export_checkpoint") from None
    return model.load(checkpoint, EVAL_BATCH_SIZE, seq_len, vocab_size)


def _score_checkpoint(model: ModelProcess, checkpoint: Path, window: np.ndarray, vocab_size: int,
                      token_bytes: torch.Tensor, device: torch.device, timings: dict[str, float]) -> dict[str, Any]:
    """status/val_bpb/probe/num_params/error for one checkpoint; DataError when it is unusable.
    Adds the seconds of each step to `timings`."""
    clock = time.monotonic()
    rows, seq_len = len(window), window.shape[1] - 1
    num_params = _load(model, checkpoint, seq_len, vocab_size)
    timings["load"], clock = time.monotonic() - clock, time.monotonic()
    first = torch.as_tensor(window[0, :-1], dtype=torch.int64)[None].to(device)
    # Token 0 exists in every vocabulary, so a model for another vocabulary still runs and shows its size.
    for inputs in (torch.zeros_like(first), first.repeat(min(rows, EVAL_BATCH_SIZE), 1)):
        try:
            model(inputs)
        except ModelCallError as exc:
            expected = (*inputs.shape, vocab_size)
            if exc.shape is not None:
                raise DataError(f"the checkpoint returns logits of shape {exc.shape}, expected {expected}: it was "
                                f"trained for another vocabulary or shape; train on this data (vocab {vocab_size})") from None
            raise DataError(f"the checkpoint does not run on int64 tokens of shape {tuple(inputs.shape)}, the "
                            f"scoring shape (sequence length {seq_len}) ({exc}): "
                            "export at trainer.prepare.scoring_seq_len() with trainer.prepare.export_checkpoint") from None
    timings["check"], clock = time.monotonic() - clock, time.monotonic()
    try:
        val_bpb, probe = score_window(model, window, token_bytes, vocab_size, device)
    except DataError:
        raise
    except Exception as exc:  # the graph failed on a batch shape it accepted before (e.g. the remainder)
        raise DataError(f"the checkpoint failed while scoring ({type(exc).__name__}: {str(exc)[:200]})") from None
    timings["score+probe"] = time.monotonic() - clock
    if probe != "passed":
        return {"status": "invalid", "probe": probe, "num_params": num_params,
                "error": f"causality probe failed: {probe}"}
    if not math.isfinite(val_bpb):
        return {"status": "invalid", "probe": probe, "num_params": num_params, "error": f"val_bpb is {val_bpb}"}
    return {"status": "ok", "val_bpb": val_bpb, "probe": probe, "num_params": num_params}
