"""The corpus-size rule of `autoresearch run` on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.errors import ConfigError
from daemon.research.corpus_check import check_corpus_for_gpu, corpus_problem

STDLIB_TOKENS = 3_700_000


def test_stdlib_corpus_is_refused_for_a_gpu_night() -> None:
    """The embedded corpus at a 5-minute GPU budget is refused, naming the passes and the climbmix fix."""
    problem = corpus_problem(STDLIB_TOKENS, 300.0, "auto", gpus=1)
    assert problem is not None
    assert "3.7 M tokens" in problem and "510 M" in problem and "138 passes" in problem
    assert "autoresearch prepare --source climbmix:4" in problem


@pytest.mark.parametrize(("tokens", "budget", "preset", "gpus"), [
    (STDLIB_TOKENS, 300.0, "auto", 0),          # no GPU: CPU presets read little
    (STDLIB_TOKENS, 300.0, "cpu", 1),           # small models on purpose
    (STDLIB_TOKENS, 300.0, "tiny", 2),
    (800_000_000, 300.0, "gpu", 1),              # ten climbmix shards
    (STDLIB_TOKENS, 2.0, "gpu", 1),              # a smoke-sized budget
])
def test_corpus_large_enough_or_no_gpu_passes(tokens: int, budget: float, preset: str, gpus: int) -> None:
    """Without a GPU, with a CPU preset, with enough tokens or a tiny budget, nothing is refused."""
    assert corpus_problem(tokens, budget, preset, gpus) is None


def test_boundary_is_two_passes_per_run() -> None:
    """Exactly two passes over the train split in one run are allowed; fewer tokens than that are not."""
    needed = 300.0 * 1.7e6
    assert corpus_problem(int(needed / 2), 300.0, "gpu", 1) is None
    assert corpus_problem(int(needed / 2) - 1, 300.0, "gpu", 1) is not None


def test_check_reads_the_prepared_split_and_raises_with_the_fix(tmp_path: Path) -> None:
    """The check reads train/meta.json and raises ConfigError whose hint is the command to run."""
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "meta.json").write_text(json.dumps({"num_tokens": STDLIB_TOKENS}))
    with pytest.raises(ConfigError) as caught:
        check_corpus_for_gpu(tmp_path, 300.0, "auto", gpus=1)
    assert caught.value.hint.startswith("autoresearch prepare --source climbmix:")
    check_corpus_for_gpu(tmp_path, 300.0, "auto", gpus=0)


def test_unprepared_or_damaged_meta_is_left_to_the_runner(tmp_path: Path) -> None:
    """No prepared data (or an unreadable meta.json) is not this rule's business: it passes."""
    check_corpus_for_gpu(tmp_path, 300.0, "gpu", gpus=1)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "meta.json").write_text("{not json")
    check_corpus_for_gpu(tmp_path, 300.0, "gpu", gpus=1)
