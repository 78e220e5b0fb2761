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
from trainer.transport import KINDS

# Probe tolerance, absolute, in nats of log-probability at a checked position.
# CPU: the twin passes run the same fp32 kernels on the same shapes, so an honest program's checked rows come
# out bit for bit equal (drift 0, measured by tests/trainer and bench/eval_transport.py); 1e-3 leaves room for
# nothing a peek could use (a peek that moves a target's log-probability by less than 1e-3 nats gains at
# most 1e-3 / ln 2 / bytes-per-token bits per byte).
CPU_PROBE_TOLERANCE = 1e-3
# CUDA (bf16 autocast, TF32, fp32 logits): derived, NOT YET MEASURED. Both twins have the same batch shape,
# so cuBLAS and the SDPA kernels take the same algorithms, and a row's outputs do not depend on the other
# rows' values (no reduction runs across rows; cuBLAS is bitwise reproducible for one configuration on one
# GPU): the expected drift is 0, as on CPU (and 0 under CPU bf16 autocast, tests/trainer/test_eval_precision.py).
# The one bound that matters is that the tolerance stays far below bf16's step near |15| (0.0625), the size of
# one rounding flip of a logit: 1e-3 keeps it 60x below. scripts/gpu_check.sh measures the twin drift of an
# honest model at this precision (bench/eval_transport.py) and fails when it exceeds this value.
GPU_PROBE_TOLERANCE = 1e-3
SCORE_CHUNK_ROWS = 4          # rows per logsumexp chunk: bounds the scorer's temporaries to (4, T, V) floats
FULL_ROW_SHARE = 4            # one probe row in this many (on average) keeps all its tokens: last position checked
TRANSPORT_ENV = "AUTORESEARCH_EVAL_TRANSPORT"  # force one transport (benches: memfd on CUDA is the old path)


def probe_tolerance(device: torch.device) -> float:
    return GPU_PROBE_TOLERANCE if device.type == "cuda" else CPU_PROBE_TOLERANCE


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


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the vocabulary, (B, T), computed SCORE_CHUNK_ROWS rows at a time: no (B, T, V) temporary."""
    out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    for start in range(0, len(logits), SCORE_CHUNK_ROWS):
        out[start:start + SCORE_CHUNK_ROWS] = torch.logsumexp(logits[start:start + SCORE_CHUNK_ROWS], dim=-1)
    return out


def target_nats(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position: logsumexp minus the target's logit (no log-softmax tensor)."""
    return lse - logits.gather(-1, targets[..., None]).squeeze(-1)


def probe_drift(scored: torch.Tensor, probed: torch.Tensor, order: torch.Tensor, cuts: torch.Tensor,
                tolerance: float = CPU_PROBE_TOLERANCE, scored_lse: torch.Tensor | None = None,
                probed_lse: torch.Tensor | None = None) -> str:
    """'passed', or how the probe's log-probabilities at checked positions differ from the scoring pass.
    `scored`/`probed` are logits; the whole vocabulary's log-probabilities (logit - logsumexp) are compared at
    every checked position, one row at a time, on the logits' device, with one host sync for the batch."""
    rows, seq_len, _ = scored.shape
    scored_lse = row_logsumexp(scored) if scored_lse is None else scored_lse
    probed_lse = row_logsumexp(probed) if probed_lse is None else probed_lse
    drifts = torch.zeros(rows, dtype=torch.float32, device=scored.device)
    ks = cuts.tolist()
    for i, k in enumerate(ks):  # row by row: a (k, V) difference at a time keeps the memory of one row
        if k == 0:
            continue
        o = int(order[i])
        difference = probed[i, :k] - scored[o, :k]
        difference -= (probed_lse[i, :k] - scored_lse[o, :k])[:, None]
        drifts[i] = difference.abs_().amax()  # NaN stays NaN
    for i, drift in enumerate(drifts.tolist()):
        k = ks[i]
        if k == 0 or drift <= tolerance:  # NaN fails
            continue
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
    and the two run in a random order; the first drift beyond the device's probe tolerance ends the scoring.
    Each answer is consumed on `device` (its logsumexp, its targets' nats, the probe) before the next batch."""
    inputs, targets = row_pairs(window)
    rows = len(inputs)
    tolerance = probe_tolerance(device)
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    shuffled = _random_permutation(rows)
    for start in range(0, rows, EVAL_BATCH_SIZE):
        picked = shuffled[start:start + EVAL_BATCH_SIZE]
        x, y = inputs[picked].to(device), targets[picked].to(device)
        probe, order, cuts = probe_batch(x, vocab_size)
        if _random_ints(1, 2).item():
            scored = model(x).float()
            probed = model(probe).float()
        else:
            probed = model(probe).float()
            scored = model(x).float()
        scored_lse = row_logsumexp(scored)
        verdict = probe_drift(scored, probed, order, cuts, tolerance, scored_lse, row_logsumexp(probed))
        if verdict != "passed":
            return math.nan, verdict
        del probed
        nats = target_nats(scored, scored_lse, y)
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
        transport_order(device)  # a malformed setting is a usage error, before any data is read
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
                              "eval_rows": len(window), "num_params": 0, "error": "", "transport": "",
                              "host_bytes_per_token": None,
                              "model_process": "own uid" if os.environ.get(PRIVSEP_ENV) else "same uid"}
    result.update(power.record())
    timings: dict[str, float] = {"data": time.monotonic() - started}
    try:
        result.update(_score_checkpoint(model, checkpoint, window, encoding.n_vocab, token_byte_lengths(encoding),
                                        device, timings))
    except DataError as exc:
        result["error"] = str(exc)
    result["eval_seconds"] = round(time.monotonic() - started, 3)
    result["timings"] = {name: round(seconds, 3) for name, seconds in timings.items()}
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


def transport_order(device: torch.device, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The transports to offer the model process, best first: device memory on CUDA (pinned host memory when
    that cannot be set up), host shared memory on CPU; AUTORESEARCH_EVAL_TRANSPORT forces one."""
    forced = (os.environ if env is None else env).get(TRANSPORT_ENV, "").strip()
    if forced:
        if forced not in KINDS:
            raise ValueError(f"{TRANSPORT_ENV}={forced!r} is not a transport: use one of {', '.join(KINDS)}")
        return (forced,)
    return ("device", "pinned-host") if device.type == "cuda" else ("memfd",)


def _load(model: ModelProcess, checkpoint: Path, seq_len: int, vocab_size: int, device: torch.device) -> int:
    """Validate the checkpoint here (trusted), then have the model process load it; its parameter count."""
    if not checkpoint.is_file():
        raise DataError(f"checkpoint {checkpoint} is missing: the train stage must write {CHECKPOINT_NAME}")
    try:
        check_checkpoint_archive(checkpoint)  # an unreadable file is a DataError here, before any copy
    except UnsafeCheckpoint as exc:
        raise DataError(f"checkpoint {checkpoint} is refused as unsafe: {exc}; save it with "
                        "trainer.prepare.export_checkpoint") from None
    params = model.load(checkpoint, EVAL_BATCH_SIZE, seq_len, vocab_size, transport_order(device), device)
    for note in model.transport_notes:  # a CUDA eval that fell back to host memory says so, loudly
        print(f"warning: transport {note}", flush=True)
    return params


def _score_checkpoint(model: ModelProcess, checkpoint: Path, window: np.ndarray, vocab_size: int,
                      token_bytes: torch.Tensor, device: torch.device, timings: dict[str, float]) -> dict[str, Any]:
    """status/val_bpb/probe/num_params/error for one checkpoint; DataError when it is unusable.
    Adds the seconds of each step to `timings`."""
    clock = time.monotonic()
    rows, seq_len = len(window), window.shape[1] - 1
    num_params = _load(model, checkpoint, seq_len, vocab_size, device)
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
    checked_bytes = model.host_bytes  # the figure is of the scoring calls (probe twins included), not the checks
    try:
        val_bpb, probe = score_window(model, window, token_bytes, vocab_size, device)
    except DataError:
        raise
    except Exception as exc:  # the graph failed on a batch shape it accepted before (e.g. the remainder)
        raise DataError(f"the checkpoint failed while scoring ({type(exc).__name__}: {str(exc)[:200]})") from None
    timings["score+probe"] = time.monotonic() - clock
    transport = {"transport": model.transport, "transport_note": "; ".join(model.transport_notes),
                 "host_bytes_per_token": round((model.host_bytes - checked_bytes) / max(rows * seq_len, 1), 2)}
    if probe != "passed":
        return {"status": "invalid", "probe": probe, "num_params": num_params,
                "error": f"causality probe failed: {probe}", **transport}
    if not math.isfinite(val_bpb):
        return {"status": "invalid", "probe": probe, "num_params": num_params, "error": f"val_bpb is {val_bpb}",
                **transport}
    return {"status": "ok", "val_bpb": val_bpb, "probe": probe, "num_params": num_params, **transport}
