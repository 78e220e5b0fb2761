"""The baseline's upstream-class parts: window pattern, value embeddings, flex == SDPA masks, batched cautious Muon."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer import train


def _model(depth: int = 2, seq_len: int = 64, vocab: int = 128) -> train.GPT:
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(vocab_size=vocab, depth=depth, model_dim=64, n_head=2, seq_len=seq_len))
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections would hide the attention path
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    return model


def test_window_pattern_and_value_embeddings_follow_upstream() -> None:
    """SSSL with a full last layer; value embeddings on alternating layers, the last one included."""
    model = _model(depth=8, seq_len=1024)
    assert [block.attn.window for block in model.blocks] == [512, 512, 512, 1024, 512, 512, 512, 1024]
    assert sorted(int(k) for k in model.value_embeds) == [1, 3, 5, 7]
    assert [block.attn.ve_gate is not None for block in model.blocks] == [i % 2 == 1 for i in range(8)]


def test_gpu_preset_is_about_fifty_million_parameters() -> None:
    """The gpu preset with the default 8192-token vocabulary has ~50 M parameters and 2^19 tokens per step."""
    preset = train.PRESETS["gpu"]
    with torch.device("meta"):
        model = train.GPT(train.GPTConfig(vocab_size=8192, depth=preset["depth"], model_dim=preset["model_dim"],
                                          n_head=preset["n_head"], seq_len=preset["seq_len"]))
    assert 45e6 < sum(p.numel() for p in model.parameters()) < 55e6
    assert preset["seq_len"] * preset["device_batch"] * preset["grad_accum"] == 2**19


def test_flex_attention_masks_equal_the_sdpa_masks() -> None:
    """The CUDA path's flex_attention block masks give the logits of the SDPA window masks (checked on CPU)."""
    model = _model()
    x = torch.randint(0, 128, (2, 64))
    with torch.no_grad():
        reference = model(x)
        model.use_flex_attention(True)
        assert model.blocks[0].attn.flex_mask is not None and model.blocks[1].attn.flex_mask is None
        flex = model(x)
    model.use_flex_attention(False)
    assert torch.allclose(flex, reference, atol=1e-5)


def test_windowed_layer_sees_neither_the_future_nor_beyond_its_window() -> None:
    """A windowed attention layer's output at t depends on tokens t-window+1..t only."""
    model = _model()
    attn, window = model.blocks[0].attn, model.blocks[0].attn.window
    x = torch.randn(1, 64, 64)
    cos, sin = model.cos[:, :, :64], model.sin[:, :, :64]
    t = 50
    with torch.no_grad():
        base = attn(x, None, cos, sin)
        for changed in (t + 1, t - window):
            other = x.clone()
            other[0, changed] += 1.0
            assert torch.allclose(attn(other, None, cos, sin)[0, t], base[0, t], atol=1e-6)
        inside = x.clone()
        inside[0, t - window + 1] += 1.0
        assert not torch.allclose(attn(inside, None, cos, sin)[0, t], base[0, t], atol=1e-6)


def test_batched_muon_step_equals_one_matrix_at_a_time() -> None:
    """Stacking same-shape matrices into one orthogonalization changes nothing but speed."""
    torch.manual_seed(1)
    together = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    batched, singles = train.Muon(together, lr=0.01), [train.Muon([p], lr=0.01) for p in alone]
    for _ in range(2):
        grads = [torch.randn(8, 4) for _ in range(3)]
        for p, q, g in zip(together, alone, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        batched.step()
        for opt in singles:
            opt.step()
    for p, q in zip(together, alone, strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_weight_decay_is_cautious() -> None:
    """Decay applies only where the update already pulls the weight towards zero; elsewhere only the update."""
    torch.manual_seed(2)
    weight, grads = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    momentum, lr = torch.tensor(0.0), torch.tensor(0.1)
    plain, decayed = weight.clone(), weight.clone()
    train.muon_update(plain, grads.clone(), torch.zeros_like(grads), momentum, lr, torch.tensor(0.0))
    train.muon_update(decayed, grads.clone(), torch.zeros_like(grads), momentum, lr, torch.tensor(0.5))
    update = (weight - plain) / lr                     # what the step subtracted
    agrees = (update * weight) > 0                     # subtracting it shrinks the weight
    assert agrees.any() and (~agrees).any()
    assert torch.equal((decayed - plain).abs() > 1e-7, agrees)
    assert torch.allclose((decayed - plain)[agrees], -0.1 * 0.5 * weight[agrees], atol=1e-6)


def test_muon_momentum_warms_up_over_300_steps() -> None:
    """Momentum ramps from 0.85 to MUON_MOMENTUM over MUON_WARMUP_STEPS steps, then stays."""
    assert train.muon_momentum(0) == 0.85
    assert abs(train.muon_momentum(150) - 0.90) < 1e-9
    assert train.muon_momentum(train.MUON_WARMUP_STEPS) == train.muon_momentum(10_000) == train.MUON_MOMENTUM


def test_every_parameter_has_exactly_one_optimizer() -> None:
    """Muon takes the block matrices, AdamW the embeddings, head and scalars; nothing twice, nothing left out."""
    model = _model(depth=4)
    optimizers = train.build_optimizers(model, torch.device("cpu"))
    owned = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert sorted(owned) == sorted(id(p) for p in model.parameters())


@pytest.mark.slow
def test_compiled_muon_step_equals_the_eager_one() -> None:
    """The CUDA path compiles the Muon step (checked here on CPU): same result as eager, schedule changes included."""
    torch.manual_seed(3)
    compiled = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(2)] + [torch.nn.Parameter(torch.randn(8, 32))]
    eager = [torch.nn.Parameter(p.detach().clone()) for p in compiled]
    fast, slow = train.Muon(compiled, lr=0.01, compiled=True), train.Muon(eager, lr=0.01)
    for step in range(3):
        for p, q in zip(compiled, eager, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for opt in (fast, slow):
            opt.param_groups[0].update(momentum=train.muon_momentum(step * 100), weight_decay=0.1 * step)
            opt.step()
    for p, q in zip(compiled, eager, strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_bf16_embeddings_train_under_autocast_and_export_in_fp32(tmp_path: Path) -> None:
    """With token and value embeddings cast to bf16 (the CUDA setting), a step under autocast updates them in
    bf16 with the fused AdamW, and the export holds fp32 weights only."""
    from trainer.prepare import export_checkpoint, load_checkpoint

    model = _model(depth=2, seq_len=64)
    model.cast_embeddings(torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16
    assert all(e.weight.dtype == torch.bfloat16 for e in model.value_embeds.values())
    optimizers = train.build_optimizers(model, torch.device("cpu"))
    before = model.wte.weight.detach().clone()
    tokens = torch.randint(0, 128, (2, 65))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    for opt in optimizers:
        opt.step()
    assert model.wte.weight.dtype == torch.bfloat16 and not torch.equal(model.wte.weight, before)
    model.use_flex_attention(False)
    program = load_checkpoint(export_checkpoint(model.float(), tmp_path, seq_len=64))
    assert {tensor.dtype for tensor in program.state_dict.values()} == {torch.float32}

