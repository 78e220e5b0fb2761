"""The lean scorer (logsumexp minus the target, chunked), its probe comparison, and the precision the model
process runs the program at (bf16 autocast on CUDA, exercised here with CPU autocast: the same graph rewrite)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from trainer import eval_stage, train
from trainer.checkpoint_check import PURE_ATEN_OPS
from trainer.eval_stage import CPU_PROBE_TOLERANCE, probe_drift, row_logsumexp, target_nats
from trainer.inference import without_dtype_asserts
from trainer.prepare import export_checkpoint, load_checkpoint

# Ops with a kernel for one device only: a checkpoint naming one cannot move to the other device.
DEVICE_ONLY_MARKERS = ("_for_cpu", "_cuda", "cudnn", "mkldnn", "_mps", "_scaled_dot_product_flash_attention",
                       "_scaled_dot_product_efficient_attention")


def _baseline(tmp_path: Path, seq_len: int = 64) -> Path:
    fields = {field.name for field in dataclasses.fields(train.GPTConfig)}
    settings = {"vocab_size": 256, "depth": 4, "model_dim": 64, "n_head": 2, "seq_len": seq_len, "max_seq_len": seq_len}
    model = train.GPT(train.GPTConfig(**{k: v for k, v in settings.items() if k in fields}))
    model.init_weights()
    with torch.no_grad():
        for parameter in model.parameters():  # away from the zero init, so every layer shapes the logits
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.use_flex_attention(False)
    return export_checkpoint(model, tmp_path, seq_len=seq_len)


def test_lean_nats_equal_cross_entropy() -> None:
    """logsumexp minus the gathered target equals cross_entropy's nats for every position."""
    torch.manual_seed(0)
    logits = 8 * torch.randn(7, 33, 301)  # an odd row count: the last chunk is partial
    targets = torch.randint(0, 301, (7, 33))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 301), targets.reshape(-1), reduction="none")
    got = target_nats(logits, row_logsumexp(logits), targets)
    assert torch.allclose(got.reshape(-1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_probe_catches_any_checked_position_and_ignores_unchecked_ones(seed: int) -> None:
    """A change of twice the tolerance in one vocabulary entry at any position before a row's cut fails the
    probe; any change at or after the cut passes."""
    generator = torch.Generator().manual_seed(seed)
    rows, seq_len, vocab = 5, 12, 40
    scored = torch.randn(rows, seq_len, vocab, generator=generator)
    order = torch.randperm(rows, generator=generator)
    cuts = torch.randint(1, seq_len, (rows,), generator=generator)
    probed = scored[order].clone()
    row = int(torch.randint(0, rows, (1,), generator=generator))
    k = int(cuts[row])
    after = probed.clone()
    after[row, k:] += torch.randn(seq_len - k, vocab, generator=generator)
    assert probe_drift(scored, after, order, cuts) == "passed"
    position = int(torch.randint(0, k, (1,), generator=generator))
    entry = int(torch.randint(0, vocab, (1,), generator=generator))
    probed[row, position, entry] += 2 * CPU_PROBE_TOLERANCE / 0.9  # the log-softmax moves by > 2x tolerance there
    assert probe_drift(scored, probed, order, cuts).startswith("log-probabilities")


def test_gpu_tolerance_is_named_and_far_below_a_bf16_step_near_the_softcap() -> None:
    """The CUDA tolerance is its own constant, and at least 16x below bf16's spacing near |15| (0.0625)."""
    assert eval_stage.probe_tolerance(torch.device("cuda")) == eval_stage.GPU_PROBE_TOLERANCE
    assert eval_stage.probe_tolerance(torch.device("cpu")) == CPU_PROBE_TOLERANCE
    step = torch.finfo(torch.bfloat16).eps * 8  # the spacing of bf16 values in [8, 16)
    assert float(torch.tensor(15.0 + step / 2 + 1e-3).bfloat16()) - 15.0 == step
    assert step >= eval_stage.GPU_PROBE_TOLERANCE * 16


def test_baseline_export_runs_under_autocast_once_its_dtype_asserts_are_dropped(tmp_path: Path) -> None:
    """The exported baseline refuses bf16 activations as exported (dtype asserts), runs under autocast without
    them, stays close to fp32, and its twin passes (rows reordered) agree bit for bit."""
    module = load_checkpoint(_baseline(tmp_path)).module()
    tokens = torch.randint(0, 256, (3, 64))
    with torch.no_grad():
        reference = module(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="dtype"):
            module(tokens)
        module = without_dtype_asserts(module)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = module(tokens).float()
            twin = module(tokens[[2, 0, 1]]).float()
    assert mixed.dtype == torch.float32 and (mixed - reference).abs().max() < 0.1
    assert torch.equal(twin[[1, 2, 0]], mixed)


def test_baseline_export_holds_no_device_only_op(tmp_path: Path) -> None:
    """The baseline's export names only device-neutral ATen ops (it must move to CUDA), and the allow-list
    itself holds no op that has a kernel for one device only."""
    program = load_checkpoint(_baseline(tmp_path))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert targets and not [t for t in targets if any(marker in t for marker in DEVICE_ONLY_MARKERS)]
    assert not [op for op in PURE_ATEN_OPS if any(marker in op for marker in DEVICE_ONLY_MARKERS)]
