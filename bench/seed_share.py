"""How much of one run's val_bpb noise the seed explains: the baseline train.py, 4 seeds x 2 repeats.

Each run trains a fixed number of steps (AUTORESEARCH_MAX_STEPS, the schedule by steps), so that machine load
does not enter through the number of steps, then the real eval stage scores it (`python -m trainer.harness`,
as `bench/trainer_cpu.py` does). A one-way analysis of variance splits the variance of single runs into a
seed part (between seeds) and a run part (between repeats of one seed):

    share = var_seed / (var_seed + var_run),  var_run = MS_within,  var_seed = (MS_between - MS_within) / repeats

This is the share of one source's noise that a second run under the same seed reproduces: an upper bound on
what pairing a candidate with the incumbent by seed can cancel (a change that alters the trajectory keeps only
part of the seed's effect). Usage: python bench/seed_share.py [--steps 200] [--seeds 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from trainer.prepare import prepare_data  # noqa: E402  (needs the repo root on sys.path)


def one_run(data_dir: Path, seed: int, env: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory(prefix="seed-share-") as tmp:
        train_out, eval_out = Path(tmp) / "train", Path(tmp) / "eval"
        for args in (["train", "--candidate", str(REPO_ROOT / "trainer" / "train.py"), "--data",
                      str(data_dir / "train"), "--out", str(train_out)],
                     ["eval", "--checkpoint", str(train_out / "model.pt2"), "--data", str(data_dir / "val"),
                      "--out", str(eval_out)]):
            done = subprocess.run([sys.executable, "-m", "trainer.harness", *args], env={**env, "AUTORESEARCH_SEED":
                                  str(seed)}, cwd=REPO_ROOT, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"stage {args[0]} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
        steps = json.loads((train_out / "train.json").read_text())["summary"]["num_steps"]
        value = float(json.loads((eval_out / "result.json").read_text())["val_bpb"])
        print(f"seed {seed}: val_bpb {value:.6f} after {steps:.0f} steps", flush=True)
        return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()
    data_dir = prepare_data("stdlib", REPO_ROOT / ".work" / "bench" / f"stdlib-{args.vocab_size}", args.vocab_size,
                            progress=lambda message: print(f"[prepare] {message}", flush=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(PYTHONPATH=str(REPO_ROOT), AUTORESEARCH_PRESET=args.preset, AUTORESEARCH_TIME_BUDGET="3000",
               AUTORESEARCH_MAX_STEPS=str(args.steps), AUTORESEARCH_EVAL_TOKENS=str(args.eval_tokens))
    runs = {seed: [one_run(data_dir, seed, env) for _ in range(args.repeats)] for seed in range(args.seeds)}
    means = [statistics.fmean(values) for values in runs.values()]
    grand = statistics.fmean(means)
    ms_between = args.repeats * sum((m - grand) ** 2 for m in means) / (args.seeds - 1)
    ms_within = sum((v - m) ** 2 for values, m in zip(runs.values(), means, strict=True) for v in values) / (
        args.seeds * (args.repeats - 1))
    var_seed = max((ms_between - ms_within) / args.repeats, 0.0)
    total = var_seed + ms_within
    print("--- seed_share")
    print(f"preset {args.preset}, {args.steps} steps, {args.seeds} seeds x {args.repeats} repeats, "
          f"{args.eval_tokens} eval tokens, vocab {args.vocab_size}")
    print(f"sd of one run:        {total ** 0.5:.6f} bpb ({100 * total ** 0.5 / grand:.2f}% of {grand:.4f})")
    print(f"sd between seeds:     {var_seed ** 0.5:.6f}")
    print(f"sd between repeats:   {ms_within ** 0.5:.6f} (same seed)")
    print(f"seed share:           {var_seed / total:.1%}" if total > 0 else "seed share: - (no variance at all)")


if __name__ == "__main__":
    main()
