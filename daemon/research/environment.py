"""The environment block of the agent's prompt: the facts a researcher would look up before an experiment.

Budget, preset, devices and their memory, the sandbox's limits, the data's size (tokens per epoch) and,
once the baseline ran, its steps, tokens/s, peak memory and how many epochs a run sees. Everything here
comes from the settings, the prepared data's meta.json and the trusted summary of the baseline run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.research.lanes import Lane
from daemon.research.ledger import tokens_per_second
from daemon.store.records import ExperimentRecord

_PRESET_LINE = re.compile(r"^preset (\w+) on ([\w:]+): ([0-9.]+)M params, depth (\d+)", re.MULTILINE)


def split_meta(data_dir: Path, split: str) -> dict[str, Any]:
    """The prepared split's meta.json, or {} when it cannot be read (the block then says so)."""
    try:
        meta = json.loads((data_dir / split / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def describe_environment(settings: Settings, lanes: Sequence[Lane], baseline: ExperimentRecord | None,
                         gpus: Sequence[Any] = ()) -> str:
    """The environment block as plain text (trusted: no text of a candidate run is quoted)."""
    training = settings.training
    lines = [
        f"- Time: one wall clock per run, from the start of train.py to its exit: "
        f"{training.compile_budget_s + training.time_budget_s:g} s in all ({training.compile_budget_s:g} s of "
        f"allowance for imports, torch.compile and export + {training.time_budget_s:g} s of training budget; "
        "compilation counts, and a run still going then is killed and never scored). train.py reads the "
        "deadline from AUTORESEARCH_DEADLINE and trains for the budget or what the deadline leaves. The trusted "
        f"eval then scores {training.eval_tokens or 'the fixed default number of'} val tokens.",
        f"- Preset setting: {training.preset} (train.py's PRESETS pick shapes per device; 'auto' = gpu on CUDA, "
        "else cpu).",
        f"- Lanes: {_lanes(lanes, gpus)}. Each run is sandboxed: {settings.sandbox.memory_gb:g} GB memory, "
        f"{settings.sandbox.cpus or 'all'} CPUs, no network.",
    ]
    train, val = split_meta(settings.data_dir, "train"), split_meta(settings.data_dir, "val")
    train_tokens = train.get("num_tokens")
    if isinstance(train_tokens, int):
        lines.append(f"- Data: train split {train_tokens:,} tokens ({train.get('num_bytes', 0):,} bytes, "
                     f"{train.get('num_documents', '?')} documents) = tokens per epoch; val split "
                     f"{_count(val.get('num_tokens'))} tokens; vocabulary {train.get('vocab_size', '?')}.")
    else:
        lines.append("- Data: the prepared split's meta.json could not be read.")
    lines.append(_baseline(baseline, train_tokens if isinstance(train_tokens, int) else None))
    return "\n".join(lines)


def _count(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _lanes(lanes: Sequence[Lane], gpus: Sequence[Any]) -> str:
    by_uuid = {str(getattr(gpu, "uuid", "")): gpu for gpu in gpus}
    described = []
    for lane in lanes:
        gpu = by_uuid.get(lane.gpu_uuid or "")
        if lane.gpu_uuid is None:
            described.append(f"{lane.name} (CPU)")
        elif gpu is not None:
            described.append(f"{lane.name} ({getattr(gpu, 'name', 'GPU')}, "
                             f"{float(getattr(gpu, 'memory_total_mb', 0)) / 1024:.0f} GB)")
        else:
            described.append(f"{lane.name} (GPU {lane.gpu_uuid})")
    return f"{len(lanes)} ({', '.join(described)})"


def _baseline(baseline: ExperimentRecord | None, train_tokens: int | None) -> str:
    if baseline is None or baseline.val_bpb is None:
        return "- Baseline: not measured yet."
    found = _PRESET_LINE.search(baseline.log_tail or "")
    shape = f"preset {found.group(1)} on {found.group(2)}, {found.group(3)}M params, depth {found.group(4)}; " \
        if found else ""
    speed = tokens_per_second(baseline)
    parts = [f"- Baseline (#{baseline.id}): {shape}val_bpb {baseline.val_bpb:.6f}"]
    if baseline.num_steps is not None:
        parts.append(f"{baseline.num_steps} steps")
    if speed is not None:
        parts.append(f"{speed:,.0f} tokens/s")
    if baseline.mfu_percent is not None:
        parts.append(f"MFU {baseline.mfu_percent:.1f}%")
    if baseline.peak_vram_mb is not None:
        parts.append(f"peak memory {baseline.peak_vram_mb:,.0f} MB")
    if baseline.total_tokens_m is not None and train_tokens:
        parts.append(f"{baseline.total_tokens_m * 1e6 / train_tokens:.2f} epochs per run")
    return ", ".join(parts) + "."


def visible_gpus(runner: object) -> list[Any]:
    """The GPUs the runner's probe sees (name, memory), or [] without a probe or when NVML fails."""
    probe = getattr(runner, "gpu_probe", None)
    if probe is None:
        return []
    try:
        return list(probe.gpus())
    except Exception:  # the block then names the lane's GPU by UUID only
        return []
