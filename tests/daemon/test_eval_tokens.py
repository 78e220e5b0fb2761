"""Eval size per night: upstream's ~21 M tokens when GPUs train the gpu preset, the trainer's default on CPU."""

from __future__ import annotations

from pathlib import Path

from daemon.config import load_settings
from daemon.service.runtime import GPU_EVAL_TOKENS, sandbox_env


def test_gpu_nights_score_upstreams_eval_size(tmp_path: Path) -> None:
    """With a GPU and the auto or gpu preset, the eval stage scores 40 x 2^19 tokens."""
    for preset in ("auto", "gpu"):
        settings = load_settings(None, workspace=tmp_path, training={"preset": preset})
        assert sandbox_env(settings, gpus=1)["AUTORESEARCH_EVAL_TOKENS"] == str(GPU_EVAL_TOKENS) == "20971520"


def test_cpu_nights_keep_the_small_default(tmp_path: Path) -> None:
    """Without a GPU, or with a CPU preset on a GPU machine, no eval size is set (the trainer's default)."""
    assert "AUTORESEARCH_EVAL_TOKENS" not in sandbox_env(load_settings(None, workspace=tmp_path), gpus=0)
    cpu = load_settings(None, workspace=tmp_path, training={"preset": "cpu"})
    assert "AUTORESEARCH_EVAL_TOKENS" not in sandbox_env(cpu, gpus=2)


def test_configured_eval_size_wins(tmp_path: Path) -> None:
    """training.eval_tokens, when set, is used on GPU and CPU alike."""
    settings = load_settings(None, workspace=tmp_path, training={"eval_tokens": 4096})
    assert sandbox_env(settings, gpus=1)["AUTORESEARCH_EVAL_TOKENS"] == "4096"
    assert sandbox_env(settings, gpus=0)["AUTORESEARCH_EVAL_TOKENS"] == "4096"
