"""Eval-stage cost, old against today's, on the same checkpoint and the same val window, side by side.

The old stage is taken from git (`--old-commit`) into a temp folder and both run as `python -m trainer.harness
eval`, as the sandbox runs them. Two comparisons are meant: `--old-commit 6e24295` (one probe batch, then
scoring) against a probe twin for every scoring batch; `--old-commit 3ea1c30` (the program run in the scorer's
own process) against the split into a scorer and a model process (trainer.model_process). Both the stage's own
eval_seconds and the whole process's wall time (interpreter start, torch import, the model process) are shown. The checkpoint is a small
causal transformer (SDPA attention, MLP, tied shapes of the cpu preset) exported with export_checkpoint.
Usage: python bench/eval_probe.py [--eval-tokens 65536] [--vocab-size 2048] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from trainer.prepare import export_checkpoint, prepare_data  # noqa: E402  (needs the repo root on sys.path)

OLD_COMMIT = "6e24295"


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.fc = torch.nn.Linear(dim, 4 * dim, bias=False)
        self.out = torch.nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(F.rms_norm(x, (dim,))).view(batch, seq, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, dim)
        x = x + self.proj(y)
        return x + self.out(F.relu(self.fc(F.rms_norm(x, (dim,)))).square())


class SmallLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int = 128, depth: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(F.rms_norm(x, (x.size(-1),)))


def _data(vocab_size: int) -> Path:
    target = REPO_ROOT / ".work" / "bench" / f"probe-data-{vocab_size}"
    corpus = REPO_ROOT / ".work" / "bench" / "probe-corpus"
    if not corpus.exists():
        corpus.mkdir(parents=True)
        copied = 0
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            shutil.copy(path, corpus / path.name)
            copied += path.stat().st_size
            if copied > 6_000_000:
                break
    return prepare_data(str(corpus), target, vocab_size, progress=lambda message: print(f"[prepare] {message}"))


def _old_trainer(commit: str, root: Path) -> Path:
    package = root / "trainer"
    package.mkdir(parents=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", commit, "trainer/"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in (n for n in names if n.endswith(".py")):
        text = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout
        (root / name).write_text(text)
    return root


def _eval(pythonpath: Path, checkpoint: Path, data: Path, out: Path, tokens: int) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(PYTHONPATH=str(pythonpath), AUTORESEARCH_EVAL_TOKENS=str(tokens))
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", "trainer.harness", "eval", "--checkpoint", str(checkpoint),
                                "--data", str(data), "--out", str(out)], env=env, cwd=pythonpath, capture_output=True, text=True,
                               check=False)
    if completed.returncode != 0:
        sys.exit(f"eval under {pythonpath} failed: {completed.stdout[-2000:]}{completed.stderr[-2000:]}")
    wall = time.monotonic() - started
    print(completed.stdout.strip().splitlines()[-1], f"(process wall {wall:.1f} s)")
    return {**json.loads((out / "result.json").read_text()), "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    args = parser.parse_args()
    data = _data(args.vocab_size) / "val"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="eval-probe-bench-") as tmp:
        work = Path(tmp)
        checkpoint = export_checkpoint(SmallLM(args.vocab_size), work)
        old_root = _old_trainer(args.old_commit, work / "old")
        seconds: dict[str, list[float]] = {"old": [], "new": []}
        walls: dict[str, list[float]] = {"old": [], "new": []}
        results: dict[str, dict[str, object]] = {}
        for _ in range(args.repeat):
            for name, root in (("old", old_root), ("new", REPO_ROOT)):
                results[name] = _eval(root, checkpoint, data, work / f"out-{name}", args.eval_tokens)
                seconds[name].append(float(str(results[name]["eval_seconds"])))
                walls[name].append(float(str(results[name]["wall_seconds"])))
    old, new = min(seconds["old"]), min(seconds["new"])
    print("--- eval_probe (eval stage seconds, best of", args.repeat, "runs; same checkpoint and window)")
    print(f"eval_tokens:       {args.eval_tokens} (vocab {args.vocab_size}, cpu threads {os.cpu_count()})")
    print(f"old_eval_seconds:  {old:.2f}   (probe: {results['old']['probe']}, val_bpb {results['old']['val_bpb']})")
    print(f"new_eval_seconds:  {new:.2f}   (probe: {results['new']['probe']}, val_bpb {results['new']['val_bpb']})")
    print(f"ratio_new_to_old:  {new / old:.2f}x   (goal <= 2.5x)")
    old_wall, new_wall = min(walls["old"]), min(walls["new"])
    print(f"process_wall:      old {old_wall:.2f} s, new {new_wall:.2f} s, ratio {new_wall / old_wall:.2f}x "
          f"(old commit {args.old_commit})")


if __name__ == "__main__":
    main()
