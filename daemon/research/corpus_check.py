"""The corpus-size rule of `autoresearch run` on a GPU: refuse data a night would read many times over.

A 5-minute run of the `gpu` preset on an H100 reads about 500 M tokens (the public autoresearch baseline:
499.6 M). The embedded stdlib corpus holds ~4 M: every run would pass over it 100+ times, and the night
would optimize memorization, not pretraining. The rule compares the prepared train split with what one
run reads at that budget and names the fix (how many climbmix shards cover it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from daemon.errors import ConfigError

GPU_TOKENS_PER_SECOND = 1.7e6       # gpu preset on one H100 (upstream: 499.6 M tokens in 300 s)
MAX_EPOCHS_PER_RUN = 2.0            # more passes over the train split than this in one run: refused
CLIMBMIX_TOKENS_PER_SHARD = 80e6    # estimate for one climbmix shard with the 8192-token BPE


def corpus_problem(train_tokens: int, budget_s: float, preset: str, gpus: int,
                   tokens_per_second: float = GPU_TOKENS_PER_SECOND) -> str | None:
    """Why this corpus is too small for a GPU night (None when it is fine, or when no GPU trains)."""
    if gpus == 0 or preset in ("cpu", "tiny"):
        return None
    needed = budget_s * tokens_per_second
    if train_tokens * MAX_EPOCHS_PER_RUN >= needed:
        return None
    shards = math.ceil(needed / MAX_EPOCHS_PER_RUN / CLIMBMIX_TOKENS_PER_SHARD)
    passes = needed / max(train_tokens, 1)
    return (f"the prepared train split holds {train_tokens / 1e6:.1f} M tokens, but one {budget_s:.0f} s GPU run reads "
            f"about {needed / 1e6:.0f} M ({passes:.0f} passes over it; at most {MAX_EPOCHS_PER_RUN:.0f} allowed): "
            f"the night would measure memorization. Fix: autoresearch prepare --source climbmix:{max(shards, 1)} "
            "(or a larger local corpus), or set training.preset = 'cpu' to run small models")


def check_corpus_for_gpu(data_dir: Path, budget_s: float, preset: str, gpus: int) -> None:
    """Raise ConfigError (with the fix) when the prepared corpus is too small for GPU runs at this budget."""
    try:
        meta = json.loads((data_dir / "train" / "meta.json").read_text())
        tokens = int(meta["num_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # no prepared data yet: the runner's own check says to run `autoresearch prepare`
    if (problem := corpus_problem(tokens, budget_s, preset, gpus)) is not None:
        message, _, fix = problem.partition(" Fix: ")
        raise ConfigError(message, hint=fix)
