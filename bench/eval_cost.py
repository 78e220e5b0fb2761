"""The eval's cost by device class and transport (old: memfd, today; new: device memory), and the probe's power.

Projections, not measurements: daemon/research/cost_model.py turns datasheet peaks (sources printed) and stated
efficiencies into seconds. Printed side by side:
1. host bytes per scored token, per transport (memfd = today, pinned host, device = issue 20's transport);
2. the eval at a size (default upstream's 40 x 2^19 tokens at the gpu preset) per device class, old vs new
   scheme, with its parts (forward, host transfer, scorer, per-call latency, fixed start-up);
3. the eval size the daemon picks per preset and device (300 s and 60 s budgets);
4. with --probe-trials N: the probe's detection probability of a one-token look-ahead at 1% of positions,
   rows -> analytic 1 - (1 - q)^rows vs a Monte-Carlo through the real trainer.eval_stage probe code.
Usage: python bench/eval_cost.py [--tokens 20971520] [--vocab 8192] [--probe-trials 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from daemon.research.cost_model import (  # noqa: E402  (needs the repo root on sys.path)
    CPU_SCHEME,
    DEVICES,
    GPU_EVAL_TOKENS,
    NEW_GPU_SCHEME,
    OLD_GPU_SCHEME,
    Scheme,
    cpu_class,
    host_bytes_per_token,
    project_eval,
    scoring_length,
    size_eval,
)
from trainer.probe_power import detection_probability, rows_needed  # noqa: E402


def transports(vocab: int) -> None:
    print(f"\n1. host bytes per scored token (vocab {vocab}, scoring + probe twin)")
    print(f"   {'transport':<14}{'seq 1024':>12}{'seq 2048':>12}")
    for transport in ("memfd", "pinned", "device"):
        label = transport + (" (old)" if transport == "memfd" else " (new)" if transport == "device" else "")
        cells = [f"{host_bytes_per_token(transport, vocab, seq):>12,.2f}" for seq in (1024, 2048)]  # type: ignore[arg-type]
        print(f"   {label:<14}" + "".join(cells))


def projections(tokens: int, vocab: int) -> None:
    tf32 = Scheme("device", "tf32", "lean")
    print(f"\n2. eval of {tokens:,} tokens at the gpu preset (seq 2048, vocab {vocab}), seconds")
    print(f"   {'device':<8} {'old memfd/fp32':>15} {'new device/tf32':>16} {'new device/bf16':>16}   "
          "new tf32 parts: forward / transfer / scorer / calls / fixed")
    for name, device in DEVICES.items():
        old = project_eval(tokens, device, OLD_GPU_SCHEME, "gpu", vocab, 2048)
        new = project_eval(tokens, device, tf32, "gpu", vocab, 2048)
        fast = project_eval(tokens, device, NEW_GPU_SCHEME, "gpu", vocab, 2048)  # what the scorer runs
        parts = " / ".join(f"{value:.1f}" for value in new.parts.values())
        print(f"   {name:<8} {old.seconds:>15.1f} {new.seconds:>16.1f} {fast.seconds:>16.1f}   {parts}")
    for cores in (2, 16):
        device = cpu_class(cores)
        cpu = project_eval(2**19, device, CPU_SCHEME, "cpu", vocab, 1024)
        print(f"   {device.name:<8} cpu preset, 2^19 tokens, seq 1024 (memfd/fp32): {cpu.seconds:.1f} s")
    print("   sources:")
    for device in (*DEVICES.values(), cpu_class(1)):
        print(f"     {device.name}: {device.source}")
    print("   assumptions: achieved share of peak bf16/tf32 0.35 (upstream's training MFU 39.8% on H100), fp32 0.6;")
    print("     host link: pinned 0.8, pageable (memfd) 0.25 of one direction of PCIe; scorer: 5 (old log_softmax)")
    print("     or 3 (lean logsumexp) passes over fp32 logits at memory bandwidth; fixed 8 s (GPU) / 10 s (CPU).")


def sizes(vocab: int) -> None:
    print("\n3. the eval the daemon picks (training.eval_tokens = 0), per preset, device and budget")
    print(f"   {'preset':<6} {'device':<8} {'budget':>6} {'tokens':>11} {'rows':>6} {'eval s':>7} {'share':>6} "
          f"{'power':>7}  note")
    cases = [("cpu", cpu_class(2), CPU_SCHEME, False), ("tiny", cpu_class(2), CPU_SCHEME, False),
             ("gpu", DEVICES["H100"], NEW_GPU_SCHEME, True), ("gpu", DEVICES["H100"], OLD_GPU_SCHEME, True),
             ("gpu", DEVICES["A100"], NEW_GPU_SCHEME, True)]
    for preset, device, scheme, cuda in cases:
        for budget in (300.0, 60.0):
            plan = size_eval(budget_s=budget, device=device, scheme=scheme, preset=preset, vocab=vocab,
                             seq_len=scoring_length(preset, cuda))
            label = device.name + ("*" if scheme is OLD_GPU_SCHEME else "")
            print(f"   {preset:<6} {label:<8} {budget:>6.0f} {plan.tokens:>11,} {plan.rows:>6} {plan.seconds:>7.1f} "
                  f"{plan.budget_share:>6.0%} {plan.probe_power:>7.4f}  {plan.note}")
    print("   * old transport (memfd/fp32); share = scoring seconds / training budget (fixed start-up excluded)")


def probe_table(trials: int, vocab: int) -> None:
    import torch

    from trainer import eval_stage

    torch.set_num_threads(1)
    seq, small_vocab = 100, 64
    own, ahead = torch.randn(small_vocab, small_vocab), torch.randn(small_vocab, small_vocab)
    mask = torch.zeros(seq)
    mask[37] = 1.0  # 1 of 100 positions reads the next token: a look-ahead at 1% of positions

    def caught(rows: int) -> bool:
        inputs = torch.randint(0, small_vocab, (rows, seq))
        for start in range(0, rows, 16):
            batch = inputs[start:start + 16]
            probe, order, cuts = eval_stage.probe_batch(batch, small_vocab)
            scored = torch.log_softmax(own[batch] + mask[None, :, None] * ahead[torch.roll(batch, -1, 1)], -1)
            probed = torch.log_softmax(own[probe] + mask[None, :, None] * ahead[torch.roll(probe, -1, 1)], -1)
            if eval_stage.probe_drift(scored, probed, order, cuts) != "passed":
                return True
        return False

    print(f"\n4. probe power: one-token look-ahead at 1% of positions (Monte-Carlo: {trials} evals per row count, "
          f"real probe_batch/probe_drift, seq {seq}, vocab {small_vocab})")
    print(f"   floor: {rows_needed(vocab_size=vocab)} rows at vocab {vocab} (P >= 0.99)")
    print(f"   {'rows':>6} {'analytic':>9} {'monte-carlo':>12} {'+-2se':>7}")
    for rows in (16, 40, 64, 128, 256, 512, 612, 1024):
        analytic = detection_probability(rows, 0.01, small_vocab)
        rate = sum(caught(rows) for _ in range(trials)) / trials
        se = (max(rate * (1 - rate), 1e-12) / trials) ** 0.5
        print(f"   {rows:>6} {analytic:>9.4f} {rate:>12.4f} {2 * se:>7.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=GPU_EVAL_TOKENS)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--probe-trials", type=int, default=0, help="Monte-Carlo evals per row count (0: skip)")
    args = parser.parse_args()
    print("--- eval_cost: projections from daemon/research/cost_model.py (arithmetic, not measured) ---")
    transports(args.vocab)
    projections(args.tokens, args.vocab)
    sizes(args.vocab)
    if args.probe_trials:
        probe_table(args.probe_trials, args.vocab)


if __name__ == "__main__":
    main()
