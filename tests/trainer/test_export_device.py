"""The baseline's export is device-neutral: no CPU-only op, and it moves to another device and runs there.

On CUDA the eval moves the exported program to the GPU (torch.export.passes.move_to_device_pass); an op with
only a CPU kernel (e.g. aten._scaled_dot_product_flash_attention_for_cpu) would fail there. No GPU here: the
move is checked onto the `meta` device, which rewrites the same device arguments the CUDA move does."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from torch.export.passes import move_to_device_pass

from trainer import train
from trainer.prepare import export_checkpoint, scoring_seq_len

PRESET = train.PRESETS["tiny"]


def _baseline_export(tmp_path: Path) -> Path:
    seq = scoring_seq_len("tiny", False)
    config = train.GPTConfig(vocab_size=512, depth=PRESET["depth"], model_dim=PRESET["model_dim"],
                             n_head=PRESET["n_head"], seq_len=PRESET["seq_len"], max_seq_len=seq)
    model = train.GPT(config)
    model.init_weights()
    model.use_flex_attention(False)
    export_checkpoint(model, tmp_path)
    return tmp_path / "model.pt2"


def test_baseline_export_holds_no_cpu_only_op(tmp_path: Path) -> None:
    """Every op of the baseline's graph has a device-neutral name: none ends in _for_cpu or names mkldnn."""
    checkpoint = _baseline_export(tmp_path)
    with zipfile.ZipFile(checkpoint) as archive:
        name = next(entry for entry in archive.namelist() if entry.endswith("models/model.json"))
        nodes = json.loads(archive.read(name))["graph_module"]["graph"]["nodes"]
    targets = {node["target"] for node in nodes}
    assert "torch.ops.aten.scaled_dot_product_attention.default" in targets  # the attention stays high-level
    assert not [t for t in targets if "_for_cpu" in t or "mkldnn" in t or "onednn" in t], sorted(targets)


def test_baseline_export_moves_to_another_device_and_runs(tmp_path: Path) -> None:
    """move_to_device_pass onto `meta` leaves a program that runs at the scoring shape there."""
    program = torch.export.load(str(_baseline_export(tmp_path)))
    moved = move_to_device_pass(program, "meta")
    seq = scoring_seq_len("tiny", False)
    out = moved.module()(torch.zeros(2, seq, dtype=torch.int64, device="meta"))
    assert out.device.type == "meta" and tuple(out.shape) == (2, seq, 512)
