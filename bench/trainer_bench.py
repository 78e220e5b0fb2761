"""Trainer bench: one preset at one budget through the real harness (train stage, then eval stage).

Prints, per candidate (the baseline, and optionally an older train.py side by side): tokens/s, MFU, steps,
val_bpb, warm-up (compile) seconds cold and warm, train- and eval-stage wall seconds, peak memory, and the
experiments per hour that budget gives (3600 / (train stage + eval stage)). Cold and warm: the first run
compiles into an empty compile cache and publishes it (trainer.compile_cache), a second short run starts
from that cache. On CPU, torch.compile is off in the baseline; --compile turns it on for the bench, so the
cold/warm difference can be measured without a GPU.

Usage: python bench/trainer_bench.py [--preset tiny] [--seconds 30] [--eval-tokens 65536] [--data DIR]
       [--old PATH_TO_OLD_TRAIN_PY] [--compile] [--warm-seconds 5] [--corpus stdlib|DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from trainer.compile_cache import CACHE_ENV, PUBLISH_ENV, PUBLISHED_DIR, harvest  # noqa: E402

FORCE_COMPILE = ("train_model = torch.compile(model) if cuda else model", "train_model = torch.compile(model)")


def run_stage(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", "trainer.harness", *args], env=env, cwd=REPO_ROOT, check=False,
                               stdout=subprocess.DEVNULL if env.get("BENCH_QUIET") else None)
    return time.monotonic() - started, completed.returncode


def prepared(data: str | None, corpus: str, vocab_size: int) -> Path:
    if data:
        return Path(data)
    from trainer.prepare import prepare_data

    name = "stdlib" if corpus == "stdlib" else Path(corpus).name
    return prepare_data(corpus, REPO_ROOT / ".work" / "bench" / f"{name}-{vocab_size}", vocab_size,
                        progress=lambda message: print(f"[prepare] {message}", flush=True))


def train_once(candidate: Path, data: Path, work: Path, env: dict[str, str], seconds: float, cache: Path,
               publish: bool) -> tuple[dict[str, float], float, int]:
    out = work / f"train-{time.monotonic_ns()}"
    stage_env = {**env, "AUTORESEARCH_TIME_BUDGET": str(seconds), CACHE_ENV: str(cache)}
    if publish:
        stage_env[PUBLISH_ENV] = "1"
    wall, code = run_stage(["train", "--candidate", str(candidate), "--data", str(data / "train"), "--out", str(out)],
                           stage_env)
    if publish and code == 0:
        harvest(out / PUBLISHED_DIR, cache)
    train_json = json.loads((out / "train.json").read_text()) if (out / "train.json").exists() else {}
    return {**train_json.get("summary", {}), "_out": str(out)}, wall, code  # type: ignore[dict-item]


def measure(label: str, source: str, args: argparse.Namespace, data: Path, env: dict[str, str]) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"trainer-bench-{label}-") as tmp:
        work = Path(tmp)
        candidate = work / "train.py"
        if args.compile:
            if FORCE_COMPILE[0] not in source:
                sys.exit(f"{label}: --compile needs the line {FORCE_COMPILE[0]!r} in train.py")
            source = source.replace(*FORCE_COMPILE)
        candidate.write_text(source)
        cache = work / "compile-cache"
        cache.mkdir()
        summary, train_wall, code = train_once(candidate, data, work, env, args.seconds, cache, publish=True)
        if code != 0:
            return {"label": label, "error": f"train stage exited {code}"}
        eval_out = work / "eval"
        eval_wall, eval_code = run_stage(["eval", "--checkpoint", str(Path(str(summary["_out"])) / "model.pt2"),
                                          "--data", str(data / "val"), "--out", str(eval_out)],
                                         {**env, "AUTORESEARCH_EVAL_TOKENS": str(args.eval_tokens)})
        result = json.loads((eval_out / "result.json").read_text()) if eval_code == 0 else {}
        warm: dict[str, float] = {}
        if args.warm_seconds > 0:
            warm, _wall, _code = train_once(candidate, data, work, env, args.warm_seconds, cache, publish=False)
    training = float(summary.get("training_seconds", 0.0)) or 1.0
    return {
        "label": label, "val_bpb": result.get("val_bpb"), "probe": result.get("probe", "-"),
        "tokens_per_s": float(summary.get("total_tokens_M", 0.0)) * 1e6 / training,
        "mfu_percent": summary.get("mfu_percent", 0.0), "steps": summary.get("num_steps", 0),
        "params_M": summary.get("num_params_M", 0.0), "peak_mem_mb": summary.get("peak_vram_mb", 0.0),
        "warmup_cold_s": summary.get("warmup_seconds", float("nan")),
        "warmup_warm_s": warm.get("warmup_seconds", float("nan")),
        "train_stage_s": train_wall, "eval_stage_s": eval_wall,
        "experiments_per_hour": 3600.0 / (train_wall + eval_wall),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seconds", type=float, default=30.0, help="training time budget")
    parser.add_argument("--warm-seconds", type=float, default=5.0, help="budget of the warm-cache run (0: skip)")
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--data", default=None, help="a prepared DATA_DIR (default: the stdlib corpus, prepared once)")
    parser.add_argument("--corpus", default="stdlib", help="what to prepare when --data is not given")
    parser.add_argument("--old", type=Path, default=None, help="another train.py to measure side by side")
    parser.add_argument("--compile", action="store_true", help="torch.compile on CPU too (cold/warm warm-up)")
    parser.add_argument("--quiet", action="store_true", help="hide the stages' own output")
    args = parser.parse_args()

    data = prepared(args.data, args.corpus, args.vocab_size)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(PYTHONPATH=str(REPO_ROOT), AUTORESEARCH_PRESET=args.preset, AUTORESEARCH_SEED="0",
               AUTORESEARCH_COMPILE_BUDGET="600")
    if args.quiet:
        env["BENCH_QUIET"] = "1"
    rows = [measure("baseline", (REPO_ROOT / "trainer" / "train.py").read_text(), args, data, env)]
    if args.old is not None:
        rows.append(measure("old", args.old.read_text(), args, data, env))
    print(f"--- trainer_bench: preset {args.preset}, budget {args.seconds:g} s, eval {args.eval_tokens} tokens, "
          f"compile {'on' if args.compile else 'baseline default'}, {os.cpu_count()} CPUs, data {data}")
    keys = ["val_bpb", "probe", "tokens_per_s", "mfu_percent", "steps", "params_M", "peak_mem_mb", "warmup_cold_s",
            "warmup_warm_s", "train_stage_s", "eval_stage_s", "experiments_per_hour"]
    print(f"{'':22}" + "".join(f"{row['label']!s:>16}" for row in rows))
    for key in keys:
        cells = []
        for row in rows:
            value = row.get(key, row.get("error", "-"))
            cells.append(f"{value:>16.4f}" if isinstance(value, float) else f"{str(value)[:16]:>16}")
        print(f"{key:22}" + "".join(cells))
    shutil.rmtree(REPO_ROOT / ".work" / "bench" / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
