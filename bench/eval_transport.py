"""The device check's one table: train the preset once cold and once warm, then score the same checkpoint through
the old transport (memfd: logits through host memory) and the new one (device memory on CUDA, or the fallback
it reports), with the eval split across two non-root uids when run as root, and project runs per GPU-hour.

Figures: torch/CUDA versions, compile (warm-up) seconds cold and warm, tokens/s, MFU, steps, eval seconds
(measured on the scored tokens the val split holds, and scaled linearly to the production size, the count
printed), host bytes per scored token, peak memory, projected runs per GPU-hour at a 300 s budget, and the
probe's twin-pass drift of the trained model at the eval's precision (fails the check above the tolerance).
Driven by scripts/gpu_check.sh; `--cpu-dry-run` runs the same steps at tiny sizes on CPU (memfd both sides).
Usage: python bench/eval_transport.py --data DATA_DIR [--preset gpu] [--seconds 60] [--warm-seconds 60]
       [--eval-tokens N] [--production-tokens 20971520] [--budget 300] [--cpu-dry-run]
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
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from trainer.compile_cache import CACHE_ENV, PUBLISH_ENV, PUBLISHED_DIR, harvest  # noqa: E402

PRODUCTION_EVAL_TOKENS = 40 * 2**19  # the daemon's GPU eval size (daemon runtime)
SCORER_UID, MODEL_UID = 1001, 1002  # the two non-root uids of the split eval (as in the container)


def _stage(args: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    started = time.monotonic()
    with log.open("a") as handle:
        code = subprocess.run([sys.executable, "-m", "trainer.harness", *args], env=env, cwd=REPO_ROOT,
                              stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    return time.monotonic() - started, code


def _train(work: Path, data: Path, env: dict[str, str], seconds: float, cache: Path, publish: bool,
           log: Path) -> dict[str, Any]:
    out = work / f"train-{'cold' if publish else 'warm'}"
    stage_env = {**env, "AUTORESEARCH_TIME_BUDGET": str(seconds), CACHE_ENV: str(cache)}
    if publish:
        stage_env[PUBLISH_ENV] = "1"
    wall, code = _stage(["train", "--candidate", str(REPO_ROOT / "trainer" / "train.py"), "--data",
                         str(data / "train"), "--out", str(out)], stage_env, log)
    if code != 0:
        sys.exit(f"the train stage exited {code}: see {log}")
    if publish:
        harvest(out / PUBLISHED_DIR, cache)
    summary = json.loads((out / "train.json").read_text()).get("summary", {})
    return {**summary, "stage_s": wall, "checkpoint": str(out / "model.pt2")}


def _split_ready(work: Path, data: Path, checkpoint: str) -> tuple[Path, Path, str]:
    """As root: a copy of the val split and the checkpoint the scorer uid may read, an out folder it owns, and
    the AUTORESEARCH_PRIVSEP value; otherwise the inputs as they are and no split."""
    if os.geteuid() != 0:
        return data / "val", Path(checkpoint), ""
    try:
        probe = subprocess.run([sys.executable, "-c", f"import torch, sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
                                "import trainer.inference"], user=MODEL_UID, group=MODEL_UID, extra_groups=[],
                               cwd="/", capture_output=True, text=True, check=False)
        why = probe.stderr.strip().splitlines()[-1:] if probe.returncode else []
    except OSError as exc:
        why = [str(exc)]
    if why:
        print(f"[check] NO EVAL SPLIT: uid {MODEL_UID} cannot run {sys.executable} with this tree ({why[0]}); "
              "scoring as one uid", flush=True)
        return data / "val", Path(checkpoint), ""
    shared = work / "split"
    shutil.copytree(data / "val", shared / "val")
    shutil.copy(checkpoint, shared / "model.pt2")
    for path in (work, shared, *shared.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    os.chown(shared, SCORER_UID, SCORER_UID)
    return shared / "val", shared / "model.pt2", f"{SCORER_UID}:{MODEL_UID}"


def _eval(label: str, transport: str, val: Path, checkpoint: Path, privsep: str, env: dict[str, str],
          tokens: int, work: Path, log: Path) -> dict[str, Any]:
    out = work / "split" / f"eval-{label}" if privsep else work / f"eval-{label}"
    stage_env = {**env, "AUTORESEARCH_EVAL_TOKENS": str(tokens)}
    if transport:
        stage_env["AUTORESEARCH_EVAL_TRANSPORT"] = transport
    if privsep:
        stage_env["AUTORESEARCH_PRIVSEP"] = privsep
    wall, code = _stage(["eval", "--checkpoint", str(checkpoint), "--data", str(val), "--out", str(out)],
                        stage_env, log)
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    if code != 0 or result.get("status") != "ok":
        return {"status": "failed", "error": f"eval exited {code}: {result.get('error') or 'see ' + str(log)}"[:200],
                "stage_s": wall}
    return {**result, "stage_s": wall}


def _drift(checkpoint: str, data: Path, device: torch.device, batches: int, seq_len: int) -> tuple[float, float]:
    """The largest twin-pass drift of checked log-probabilities of an honest model at the eval's precision, over
    `batches` batches of val rows, and the tolerance the eval applies on this device."""
    from trainer import eval_stage
    from trainer.inference import forward_context, load_program
    from trainer.prepare import EVAL_BATCH_SIZE, eval_token_window, row_pairs

    module, _ = load_program(checkpoint, device)
    window = eval_token_window(data / "val", EVAL_BATCH_SIZE * seq_len * batches, seq_len)
    inputs, _ = row_pairs(window)
    worst = 0.0
    with torch.no_grad(), forward_context(device):
        for start in range(0, len(inputs), EVAL_BATCH_SIZE):
            x = inputs[start:start + EVAL_BATCH_SIZE].to(device)
            probe, order, cuts = eval_stage.probe_batch(x, int(module(x[:1]).shape[-1]))
            scored, probed = module(x).float(), module(probe).float()
            slse, plse = eval_stage.row_logsumexp(scored), eval_stage.row_logsumexp(probed)
            for i, k in enumerate(cuts.tolist()):
                if k:
                    o = int(order[i])
                    difference = (probed[i, :k] - scored[o, :k]) - (plse[i, :k] - slse[o, :k])[:, None]
                    worst = max(worst, float(difference.abs().amax()))
    return worst, eval_stage.probe_tolerance(device)


def _projection(train: dict[str, Any], evaluation: dict[str, Any], seconds: float, budget: float,
                production: int) -> tuple[float, float]:
    """(eval seconds scaled to `production` tokens, runs per GPU-hour at `budget`): the train stage's measured
    wall minus its measured training seconds plus the budget, then the eval stage's wall with its score+probe
    part scaled linearly by production / scored tokens (start-up, load and the shape check are paid once)."""
    if evaluation.get("status") != "ok":
        return float("nan"), float("nan")
    scored = max(int(evaluation["eval_rows"]) * int(evaluation["seq_len"]), 1)
    scoring = float(evaluation.get("timings", {}).get("score+probe", evaluation["stage_s"]))
    scaled = float(evaluation["stage_s"]) + scoring * (max(production / scored, 1.0) - 1.0)
    train_stage = float(train["stage_s"]) - float(train.get("training_seconds", seconds)) + budget
    return scaled, 3600.0 / (train_stage + scaled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--preset", default="gpu")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warm-seconds", type=float, default=60.0)
    parser.add_argument("--eval-tokens", type=int, default=PRODUCTION_EVAL_TOKENS,
                        help="tokens to score (capped by the val split; the figure is scaled to production)")
    parser.add_argument("--production-tokens", type=int, default=PRODUCTION_EVAL_TOKENS)
    parser.add_argument("--budget", type=float, default=300.0)
    parser.add_argument("--drift-batches", type=int, default=8)
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on CPU: the code path only")
    args = parser.parse_args()
    if args.cpu_dry_run:
        args.preset, args.seconds, args.warm_seconds, args.eval_tokens, args.drift_batches = "tiny", 20, 20, 16384, 1
    cuda = torch.cuda.is_available() and not args.cpu_dry_run
    if not cuda and not args.cpu_dry_run:
        sys.exit("no CUDA device: run with --cpu-dry-run for the code path on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(PYTHONPATH=str(REPO_ROOT), AUTORESEARCH_PRESET=args.preset, AUTORESEARCH_SEED="0",
               AUTORESEARCH_COMPILE_BUDGET="300")
    if args.cpu_dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    log = work / "stages.log"
    print(f"[check] work folder {work} (stage output in {log})", flush=True)
    cache = work / "compile-cache"
    cache.mkdir()
    cold = _train(work, args.data, env, args.seconds, cache, True, log)
    print(f"[check] cold train stage {cold['stage_s']:.0f} s", flush=True)
    warm = _train(work, args.data, env, args.warm_seconds, cache, False, log)
    print(f"[check] warm train stage {warm['stage_s']:.0f} s", flush=True)
    val, checkpoint, privsep = _split_ready(work, args.data, warm["checkpoint"])
    columns = {"old (memfd)": "memfd", "new (auto)": ""}
    evals = {}
    for label, transport in columns.items():
        evals[label] = _eval(label.split()[0], transport, val, checkpoint, privsep, env, args.eval_tokens, work, log)
        print(f"[check] eval {label}: {evals[label].get('stage_s', 0):.1f} s "
              f"{evals[label].get('transport', '')} {evals[label].get('error', '')}", flush=True)
    from trainer.prepare import scoring_seq_len

    seq_len = scoring_seq_len(args.preset, cuda)
    drift, tolerance = _drift(warm["checkpoint"], args.data, device, args.drift_batches, seq_len)

    print(f"--- gpu_check ({'CPU DRY RUN: code path only, sizes tiny' if args.cpu_dry_run else 'CUDA'}); "
          f"data {args.data} (stdlib corpus: val_bpb measures the code path, not pretraining quality)")
    print(f"torch {torch.__version__} | CUDA {torch.version.cuda} | device "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'} | eval split: "
          f"{'two uids ' + privsep if privsep else 'ONE uid (not root, or the model uid cannot run this Python)'}"
          " | the image pins another torch: "
          "this run proves nothing about that build")
    rows: list[tuple[str, Any, Any]] = []
    for key, name in (("warmup_seconds", "compile cold s"),):
        rows.append((name, cold.get(key), cold.get(key)))
    rows.append(("compile warm s", warm.get("warmup_seconds"), warm.get("warmup_seconds")))
    training = float(warm.get("training_seconds", 0) or 1)
    tokens_per_s = float(warm.get("total_tokens_M", 0)) * 1e6 / training
    rows += [("tokens/s (warm)", tokens_per_s, tokens_per_s), ("MFU % (warm)", warm.get("mfu_percent"),
                                                                warm.get("mfu_percent")),
             ("steps (warm)", warm.get("num_steps"), warm.get("num_steps")),
             ("peak memory MB", warm.get("peak_vram_mb"), warm.get("peak_vram_mb"))]
    old, new = evals["old (memfd)"], evals["new (auto)"]
    rows += [("transport", old.get("transport") or old.get("error"), new.get("transport") or new.get("error")),
             ("scored tokens", _scored(old), _scored(new)),
             ("eval stage s (measured)", old.get("stage_s"), new.get("stage_s")),
             ("host bytes/scored token", old.get("host_bytes_per_token"), new.get("host_bytes_per_token")),
             ("val_bpb", old.get("val_bpb"), new.get("val_bpb"))]
    old_scaled, old_runs = _projection(warm, old, args.warm_seconds, args.budget, args.production_tokens)
    new_scaled, new_runs = _projection(warm, new, args.warm_seconds, args.budget, args.production_tokens)
    rows += [(f"eval s at {args.production_tokens} tok", old_scaled, new_scaled),
             (f"runs/GPU-hour at {args.budget:.0f} s", old_runs, new_runs)]
    print(f"{'':28}{'old (memfd)':>18}{'new':>18}")
    for name, a, b in rows:
        print(f"{name:28}{_cell(a)}{_cell(b)}")
    if new.get("transport_note"):
        print(f"new transport note: {new['transport_note']}")
    print(f"probe twin drift: {drift:.3g} nats (tolerance {tolerance:g} on {device.type})")
    if not drift <= tolerance:
        sys.exit(f"FAIL: an honest model drifts {drift:.3g} between twin passes, above the tolerance "
                 f"{tolerance:g}: raise trainer.eval_stage.{'GPU' if cuda else 'CPU'}_PROBE_TOLERANCE from this figure")
    if any(e.get("status") != "ok" for e in evals.values()):
        sys.exit("FAIL: an eval did not score (see above)")


def _scored(evaluation: dict[str, Any]) -> Any:
    return int(evaluation["eval_rows"]) * int(evaluation["seq_len"]) if "eval_rows" in evaluation else None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:>18,.1f}" if abs(value) >= 1000 else f"{value:>18.4g}"
    return f"{'-' if value is None else str(value)[:17]:>18}"


if __name__ == "__main__":
    main()
