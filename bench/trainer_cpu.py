"""CPU trainer benchmark: tokens/s and val_bpb of the baseline `cpu` preset after 60 s on the stdlib corpus.

Prepares the embedded `stdlib` corpus once into .work/bench/stdlib-data (cached), then runs the real
train and eval stages (`python -m trainer.harness`) as the sandbox would, and prints the figures.
Usage: python bench/trainer_cpu.py [--seconds 60] [--eval-tokens 131072] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from trainer.prepare import prepare_data  # noqa: E402  (needs the repo root on sys.path)


def run_stage(args: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", "trainer.harness", *args], env=env, cwd=REPO_ROOT, check=False)
    if completed.returncode != 0:
        sys.exit(f"stage {args[0]} failed with exit code {completed.returncode}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    parser.add_argument("--eval-tokens", type=int, default=131072)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()

    data_dir = prepare_data("stdlib", REPO_ROOT / ".work" / "bench" / f"stdlib-{args.vocab_size}", args.vocab_size,
                            progress=lambda message: print(f"[prepare] {message}", flush=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(PYTHONPATH=str(REPO_ROOT), AUTORESEARCH_PRESET=args.preset, AUTORESEARCH_TIME_BUDGET=str(args.seconds),
               AUTORESEARCH_EVAL_TOKENS=str(args.eval_tokens))
    with tempfile.TemporaryDirectory(prefix="trainer-bench-") as tmp:
        train_out, eval_out = Path(tmp) / "train", Path(tmp) / "eval"
        train_wall = run_stage(["train", "--candidate", str(REPO_ROOT / "trainer" / "train.py"),
                                "--data", str(data_dir / "train"), "--out", str(train_out)], env)
        eval_wall = run_stage(["eval", "--checkpoint", str(train_out / "model.pt2"), "--data", str(data_dir / "val"),
                               "--out", str(eval_out)], env)
        summary = json.loads((train_out / "train.json").read_text())["summary"]
        result = json.loads((eval_out / "result.json").read_text())
    tokens_per_second = summary["total_tokens_M"] * 1e6 / summary["training_seconds"]
    print("--- trainer_cpu")
    print(f"preset:            {args.preset} ({summary['num_params_M']}M params, depth {summary['depth']:.0f})")
    print(f"cpu_threads:       {os.cpu_count()}")
    print(f"training_seconds:  {summary['training_seconds']:.1f}")
    print(f"num_steps:         {summary['num_steps']:.0f}")
    print(f"tokens_per_second: {tokens_per_second:,.0f}")
    print(f"val_bpb:           {result['val_bpb']:.4f} ({result['status']}, probe {result['probe']}, "
          f"{args.eval_tokens} eval tokens)")
    print(f"train_stage_wall:  {train_wall:.1f} s")
    print(f"eval_stage_wall:   {eval_wall:.1f} s")


if __name__ == "__main__":
    main()
