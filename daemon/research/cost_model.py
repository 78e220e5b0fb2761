"""The cost model of one experiment: how long its eval and its train stage take, and what cannot fit.

From the preset's shapes, the eval size, the vocabulary, the scoring length, the transport between scorer
and model process, and the device class, it projects the eval stage's seconds (forward FLOPs, host traffic,
scorer memory traffic, per-call latency, fixed start-up) and the train stage's (start-up, compile allowance,
budget, export). The daemon uses it at start-up (`run`, `once`, `try`) and `doctor` uses it too:

- `size_eval` picks the eval size when `training.eval_tokens` is 0 (daemon/service/runtime.py);
- `derived_eval_timeout` gives `sandbox.eval_timeout_s` when it is 0 (the default);
- `capacity_problems` lists what cannot finish inside its limits; the daemon refuses to start on any of them
  (ConfigError, exit 2) with the numbers and the fix.

Projections are arithmetic on datasheet peaks times stated efficiencies, not measurements: every figure
below says where it comes from. bench/eval_cost.py prints them per device class and transport.

Eval sizing (`size_eval`), in order:
1. target: upstream's 40 x 2^19 tokens on GPU nights at the gpu preset, the trainer's 2^19 otherwise;
2. at most EVAL_BUDGET_SHARE (10%) of the training budget, by the projection;
3. at least enough rows that the eval's own sampling error is small against the judge's sigma:
   the judge compares runs scored on the SAME rows, so what the finite sample adds to a comparison is the
   spread of per-row differences between two models, s_d, over sqrt(R): SE_diff = s_d / sqrt(R). We ask
   SE_diff <= SAMPLING_RATIO * sigma, i.e. R >= (s_d / (SAMPLING_RATIO * sigma))^2. (The error of the
   absolute val_bpb, s_row / sqrt(R), is common to every run and cancels in the judge's comparisons.)
4. never below the probe floor (trainer.probe_power.rows_needed: a 1% one-token look-ahead caught with
   probability >= 0.99). Where 2 and 4 conflict the probe floor wins and the plan's note says what share of
   the budget the eval then takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from trainer.probe_power import detection_probability, rows_needed

if TYPE_CHECKING:
    from daemon.config import Settings

Transport = Literal["memfd", "pinned", "device"]
Precision = Literal["fp32", "tf32", "bf16"]
Scorer = Literal["log_softmax", "lean"]

EVAL_BATCH_ROWS = 16            # trainer.prepare.EVAL_BATCH_SIZE
PROBE_PASSES = 2                # every scoring batch has a probe twin of the same shape
GPU_EVAL_TOKENS = 40 * 2**19    # upstream's eval size (~21 M tokens)
CPU_EVAL_TOKENS = 2**19         # trainer.prepare.EVAL_TOKENS
EVAL_BUDGET_SHARE = 0.10        # the eval may take this share of the training budget
SAMPLING_RATIO = 0.5            # SE_diff <= this x the judge's sigma (adds <= 12% to the comparison's noise)
# Assumptions of the sampling rule (not measured yet: replace with a measurement when one exists).
ROW_DIFF_SD_BPB = 0.02          # s_d: per-row sd of the bpb difference between two nearby candidates
JUDGE_SIGMA_PRIOR = {"gpu": 0.0015, "cpu": 0.005}  # seed noise before the night measures it (bpb)
EVAL_TIMEOUT_MARGIN = 3.0       # derived eval timeout = margin x projection + fixed start-up
CONTROL_BYTES_PER_CALL = 512    # device transport: request + reply over the socket, no tensors
CALL_LATENCY_S = {"memfd": 2e-3, "pinned": 1e-3, "device": 3e-4}  # socket round trip + synchronisation
SCORER_PASSES = {"log_softmax": 5, "lean": 3}  # reads/writes of a (rows, T, vocab) fp32 tensor per pass


@dataclass(frozen=True)
class DeviceClass:
    """Peak figures of one device class (dense, no sparsity) and where they come from."""

    name: str
    kind: Literal["gpu", "cpu"]
    tflops: dict[str, float]      # peak dense TFLOP/s by forward precision
    memory_gbps: float            # device memory bandwidth (GB/s)
    host_link_gbps: float         # host <-> device, one direction (GB/s); CPU: host memory copies
    source: str
    efficiency: dict[str, float] = field(default_factory=dict)  # achieved share of the peak by precision
    fixed_eval_s: float = 8.0     # container start, imports, CUDA init, checkpoint load and its first calls


GPU_EFFICIENCY = {"bf16": 0.35, "tf32": 0.35, "fp32": 0.6}  # bf16: upstream's training MFU 39.8% (H100)
PINNED_SHARE, PAGEABLE_SHARE = 0.8, 0.25  # achieved share of the link: pinned DMA, pageable (memfd) copies

DEVICES: dict[str, DeviceClass] = {
    "H100": DeviceClass("H100", "gpu", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}, 3350.0, 64.0,
                        "NVIDIA H100 SXM5 datasheet: FP32 67, TF32 989*/2, BF16 1979*/2 TFLOPS (*sparse), "
                        "HBM3 3.35 TB/s, PCIe Gen5 x16 128 GB/s both ways", dict(GPU_EFFICIENCY)),
    "H200": DeviceClass("H200", "gpu", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}, 4800.0, 64.0,
                        "NVIDIA H200 SXM datasheet: compute as H100 SXM, HBM3e 4.8 TB/s, PCIe Gen5 x16",
                        dict(GPU_EFFICIENCY)),
    "A100": DeviceClass("A100", "gpu", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}, 2039.0, 32.0,
                        "NVIDIA A100 80GB SXM datasheet: FP32 19.5, TF32 156, BF16 312 TFLOPS dense, "
                        "HBM2e 2,039 GB/s, PCIe Gen4 x16 64 GB/s both ways", dict(GPU_EFFICIENCY)),
    "L40S": DeviceClass("L40S", "gpu", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0}, 864.0, 32.0,
                        "NVIDIA L40S datasheet: FP32 91.6, TF32 366*/2, BF16 733*/2 TFLOPS (*sparse), "
                        "GDDR6 864 GB/s, PCIe Gen4 x16", dict(GPU_EFFICIENCY)),
}
# One CPU core with AVX2: 2 FMA units x 8 fp32 lanes x 2 FLOP x ~2.5 GHz = 80 GFLOP/s peak; efficiency 0.55 and
# 10 GB/s of copies per core calibrated against issue 20's measurement here (2^19 tokens at the cpu preset,
# twin-probed, 2 cores: 69-80 s in Docker).
CPU_CORE_GFLOPS, CPU_CORE_COPY_GBPS, CPU_EFFICIENCY = 80.0, 10.0, 0.55


def cpu_class(cores: float) -> DeviceClass:
    """The CPU class for a container with this CPU quota."""
    cores = max(cores, 1.0)
    return DeviceClass(f"CPU x{cores:g}", "cpu", {"fp32": cores * CPU_CORE_GFLOPS / 1000}, cores * CPU_CORE_COPY_GBPS,
                       cores * CPU_CORE_COPY_GBPS,
                       f"{CPU_CORE_GFLOPS:g} GFLOP/s per AVX2 core (2x256-bit FMA at ~2.5 GHz), efficiency "
                       f"{CPU_EFFICIENCY} calibrated on issue 20's 2-core measurement",
                       {"fp32": CPU_EFFICIENCY}, fixed_eval_s=10.0)


def device_for_gpu(name: str) -> DeviceClass | None:
    """The class of an NVML device name ('NVIDIA H100 80GB HBM3'), None when it is not one we know."""
    upper = name.upper()
    return next((device for key, device in DEVICES.items() if key in upper), None)


def slowest_gpu() -> DeviceClass:
    """The known GPU class with the least tensor throughput: the projection for a GPU we cannot name."""
    return min(DEVICES.values(), key=lambda device: device.tflops["tf32"])


@dataclass(frozen=True)
class Shapes:
    """A preset's model shapes (trainer/train.py PRESETS) as far as the cost is concerned."""

    depth: int
    model_dim: int


PRESET_SHAPES = {"gpu": Shapes(8, 512), "cpu": Shapes(4, 128), "tiny": Shapes(2, 64)}


def forward_flops_per_token(shapes: Shapes, vocab: int, seq_len: int) -> float:
    """2 FLOPs per matrix weight (blocks: 12 d^2 each; the head: d x vocab) plus causal attention over half
    the context on average (QK^T and AV: 4 d x T/2 per layer), as trainer/train.py's flops_per_token / 3."""
    d = shapes.model_dim
    matrix = shapes.depth * 12 * d * d + d * vocab
    return 2.0 * matrix + 4.0 * d * (seq_len / 2) * shapes.depth


def host_bytes_per_token(transport: Transport, vocab: int, seq_len: int) -> float:
    """Bytes through host memory per scored token, both passes (scoring + probe twin).
    memfd / pinned: the int64 input goes in (written by the scorer, read by the model process) and the fp32
    logits come out (written by the model process, read back by the scorer): 2 x (8 + 8 x vocab) per token.
    device: logits stay in device memory the scorer owns; only control messages cross."""
    if transport == "device":
        return PROBE_PASSES * CONTROL_BYTES_PER_CALL / (EVAL_BATCH_ROWS * seq_len)
    return PROBE_PASSES * (2 * 8 + 2 * 4 * vocab)


@dataclass(frozen=True)
class Scheme:
    """How the eval runs: transport, forward precision, scorer."""

    transport: Transport
    precision: Precision
    scorer: Scorer

    def label(self) -> str:
        return f"{self.transport}/{self.precision}/{self.scorer}"


OLD_GPU_SCHEME = Scheme("memfd", "fp32", "log_softmax")   # today: logits through host shared memory
NEW_GPU_SCHEME = Scheme("device", "bf16", "lean")         # trainer.transport + bf16 autocast (as train.py trains)
CPU_SCHEME = Scheme("memfd", "fp32", "lean")


@dataclass(frozen=True)
class EvalProjection:
    tokens: int
    rows: int
    seconds: float
    parts: dict[str, float]
    host_bytes_per_token: float


def project_eval(tokens: int, device: DeviceClass, scheme: Scheme, preset: str, vocab: int,
                 seq_len: int) -> EvalProjection:
    """Projected eval-stage seconds for `tokens` scored tokens (rows of seq_len), with the probe twin."""
    rows = max(tokens // seq_len, 1)
    scored = rows * seq_len * PROBE_PASSES
    precision = scheme.precision if scheme.precision in device.tflops else "fp32"
    flops_rate = device.tflops[precision] * 1e12 * device.efficiency.get(precision, 0.35)
    per_token = host_bytes_per_token(scheme.transport, vocab, seq_len)
    share = {"memfd": PAGEABLE_SHARE, "pinned": PINNED_SHARE, "device": 1.0}[scheme.transport]
    link = device.host_link_gbps * 1e9 * (share if device.kind == "gpu" else 1.0)
    parts = {
        "forward": scored * forward_flops_per_token(PRESET_SHAPES[preset], vocab, seq_len) / flops_rate,
        "transfer": rows * seq_len * per_token / link,
        "scorer": scored * 4 * vocab * SCORER_PASSES[scheme.scorer] / (device.memory_gbps * 1e9),
        "calls": PROBE_PASSES * math.ceil(rows / EVAL_BATCH_ROWS) * CALL_LATENCY_S[scheme.transport],
        "fixed": device.fixed_eval_s,
    }
    return EvalProjection(rows * seq_len, rows, sum(parts.values()), parts, per_token)


def tokens_within(seconds: float, device: DeviceClass, scheme: Scheme, preset: str, vocab: int,
                  seq_len: int) -> int:
    """The most tokens (whole rows) whose projected eval takes at most `seconds` (0 when even one row does not)."""
    def fits(rows: int) -> bool:
        return project_eval(rows * seq_len, device, scheme, preset, vocab, seq_len).seconds <= seconds

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * seq_len


def sampling_rows(judge_sigma: float, row_diff_sd: float = ROW_DIFF_SD_BPB, ratio: float = SAMPLING_RATIO) -> int:
    """R with s_d / sqrt(R) <= ratio x sigma (module docstring, rule 3)."""
    return math.ceil((row_diff_sd / (ratio * judge_sigma)) ** 2)


@dataclass(frozen=True)
class EvalPlan:
    """The eval the daemon runs: its size, its projection, the probe's power and why it is this size."""

    tokens: int
    rows: int
    seq_len: int
    device: str
    scheme: str
    seconds: float
    budget_share: float       # scoring seconds (without the fixed start-up) over the training budget
    probe_power: float
    probe_rows: int
    sampling_se: float
    judge_sigma: float
    explicit: bool
    note: str

    def describe(self) -> str:
        return (f"eval {self.tokens} tokens ({self.rows} rows of {self.seq_len}) on {self.device} "
                f"[{self.scheme}]: ~{self.seconds:.1f} s with start-up, scoring {self.budget_share:.0%} of the "
                f"training budget; probe "
                f"power {self.probe_power:.4f} (floor {self.probe_rows} rows); sampling SE {self.sampling_se:.5f} "
                f"bpb vs judge sigma {self.judge_sigma:.4f}. {self.note}".strip())


def size_eval(*, budget_s: float, device: DeviceClass, scheme: Scheme, preset: str, vocab: int, seq_len: int,
              explicit_tokens: int = 0, judge_sigma: float | None = None, probe_floor: bool = True) -> EvalPlan:
    """The eval size for a night (module docstring: rules 1-4); explicit_tokens > 0 is taken as given."""
    sigma = judge_sigma if judge_sigma is not None else JUDGE_SIGMA_PRIOR[device.kind]
    probe_rows = rows_needed(vocab_size=vocab)
    # The share is of scoring seconds: the eval stage's fixed start-up does not shrink with the eval.
    cap_tokens = tokens_within(EVAL_BUDGET_SHARE * budget_s + device.fixed_eval_s, device, scheme, preset, vocab,
                               seq_len)
    note = ""
    if explicit_tokens:
        tokens = explicit_tokens
    else:
        target = GPU_EVAL_TOKENS if device.kind == "gpu" and preset == "gpu" else CPU_EVAL_TOKENS
        tokens = max(min(target, cap_tokens), sampling_rows(sigma) * seq_len)
        if tokens > cap_tokens:
            note = "the sampling rule needs more than 10% of the budget"
        if probe_floor and tokens < probe_rows * seq_len:
            tokens = probe_rows * seq_len
            note = "the probe floor wins over the 10% budget share"
    projection = project_eval(tokens, device, scheme, preset, vocab, seq_len)
    share = (projection.seconds - device.fixed_eval_s) / budget_s
    if note:
        note = f"{note}: scoring takes {share:.0%} of the training budget (target {EVAL_BUDGET_SHARE:.0%})."
    return EvalPlan(projection.tokens, projection.rows, seq_len, device.name, scheme.label(), projection.seconds,
                    share, detection_probability(projection.rows, vocab_size=vocab), probe_rows,
                    ROW_DIFF_SD_BPB / math.sqrt(projection.rows), sigma, bool(explicit_tokens), note)


def derived_eval_timeout(plan: EvalPlan) -> float:
    """sandbox.eval_timeout_s when it is 0: the projection with a margin, in whole minutes (at least 2)."""
    seconds = EVAL_TIMEOUT_MARGIN * plan.seconds
    return max(120.0, 60.0 * math.ceil(seconds / 60.0))


@dataclass(frozen=True)
class TrainProjection:
    """The train stage: start-up, compile allowance, training budget, export; and the limit they must fit."""

    startup_s: float
    compile_s: float
    budget_s: float
    export_s: float
    limit_s: float

    @property
    def seconds(self) -> float:
        return self.startup_s + self.compile_s + self.budget_s + self.export_s


STARTUP_S = {"gpu": 20.0, "cpu": 10.0}   # interpreter, torch import, data memmap (assumed)
EXPORT_S = {"gpu": 30.0, "cpu": 10.0}    # torch.export of the model at the scoring shape and the archive write


def project_train(*, budget_s: float, compile_budget_s: float, device: DeviceClass, limit_s: float) -> TrainProjection:
    """The train stage's seconds at most (the compile allowance counts whole) against its container limit."""
    return TrainProjection(STARTUP_S[device.kind], compile_budget_s, budget_s, EXPORT_S[device.kind], limit_s)


def capacity_problems(plan: EvalPlan, eval_timeout_s: float, train: TrainProjection, *, probe_floor: bool,
                      val_rows: int | None = None) -> list[tuple[str, str]]:
    """(problem with its numbers, fix) for each thing that cannot finish inside its limits; empty when all fit."""
    problems: list[tuple[str, str]] = []
    if plan.seconds > eval_timeout_s:
        problems.append((f"the eval is projected at {plan.seconds:.0f} s ({plan.tokens} tokens on {plan.device}, "
                         f"{plan.scheme}), over sandbox.eval_timeout_s = {eval_timeout_s:.0f} s",
                         f"set sandbox.eval_timeout_s = 0 (derived: {derived_eval_timeout(plan):.0f} s) or "
                         f">= {math.ceil(plan.seconds)}, or lower training.eval_tokens"))
    if probe_floor and plan.rows < plan.probe_rows:
        problems.append((f"training.eval_tokens = {plan.tokens} scores {plan.rows} rows: the causality probe "
                         f"catches a 1% look-ahead with probability {plan.probe_power:.2f} (< 0.99 needs "
                         f"{plan.probe_rows} rows)",
                         f"set training.eval_tokens >= {plan.probe_rows * plan.seq_len} or 0 (sized by the daemon)"))
    if probe_floor and val_rows is not None and val_rows < plan.probe_rows:
        problems.append((f"the val split holds about {val_rows} rows of {plan.seq_len} tokens, fewer than the "
                         f"{plan.probe_rows} the causality probe needs", "prepare a bigger corpus "
                         "(`autoresearch prepare`) so its val split holds them"))
    if train.seconds > train.limit_s:
        problems.append((f"the train stage is projected at {train.seconds:.0f} s (start-up {train.startup_s:.0f} + "
                         f"compile {train.compile_s:.0f} + budget {train.budget_s:.0f} + export {train.export_s:.0f}), "
                         f"over its {train.limit_s:.0f} s limit", "raise training.startup_grace_s"))
    return problems


# ---------------------------------------------------------------------------------------------
# The night's plan from the daemon's settings

@dataclass(frozen=True)
class NightPlan:
    """What the daemon will run per experiment on this machine, and what cannot fit."""

    preset: str
    device: DeviceClass
    device_note: str
    eval: EvalPlan
    eval_timeout_s: float
    timeout_derived: bool
    train: TrainProjection
    problems: list[tuple[str, str]]

    def lines(self) -> list[str]:
        timeout = f"{self.eval_timeout_s:.0f} s" + (" (derived)" if self.timeout_derived else " (configured)")
        return [f"preset {self.preset} on {self.device.name}{self.device_note}", self.eval.describe(),
                f"eval timeout {timeout}; train stage <= {self.train.seconds:.0f} s of its {self.train.limit_s:.0f} s limit"]


def scoring_length(preset: str, cuda: bool) -> int:
    """As trainer.prepare.scoring_seq_len (a test keeps the two equal), without importing torch."""
    return 2048 if preset == "gpu" or (preset in ("auto", "tiny") and cuda) else 1024


def plan_night(settings: Settings, gpu_names: list[str], cpus: float) -> NightPlan:
    """The eval size, eval timeout and train-stage projection for these settings on this machine."""
    from trainer.layout import read_split_meta

    training, sandbox = settings.training, settings.sandbox
    slurm_gpus = sandbox.backend == "slurm" and bool(settings.slurm.gres)
    cuda = bool(gpu_names) or slurm_gpus
    preset = training.preset if training.preset != "auto" else ("gpu" if cuda else "cpu")
    note = ""
    if cuda:
        known = [device for device in map(device_for_gpu, gpu_names) if device is not None]
        if known and len(known) == len(gpu_names):
            device = min(known, key=lambda found: found.tflops["tf32"])
        else:
            device = slowest_gpu()
            note = f" (GPU model {'picked by Slurm' if slurm_gpus else 'not known'}: projected for the slowest known)"
    else:
        device = cpu_class(cpus)
    scheme = (NEW_GPU_SCHEME if cuda else CPU_SCHEME)
    vocab, val_tokens = settings.data.vocab_size, None
    try:
        meta = read_split_meta(settings.data_dir / "val")
        vocab, val_tokens = int(meta["vocab_size"]), int(meta["num_tokens"])
    except Exception:  # not prepared yet (`prepare` comes later): the configured vocabulary, no split check
        pass
    seq_len = scoring_length(preset, cuda)
    plan = size_eval(budget_s=training.time_budget_s, device=device, scheme=scheme, preset=preset, vocab=vocab,
                     seq_len=seq_len, explicit_tokens=training.eval_tokens, probe_floor=training.probe_floor)
    derived = sandbox.eval_timeout_s == 0
    timeout = derived_eval_timeout(plan) if derived else sandbox.eval_timeout_s
    # The limit is the runner's train-stage container limit (daemon/service/runtime.py make_runner).
    train = project_train(budget_s=training.time_budget_s, compile_budget_s=training.compile_budget_s, device=device,
                          limit_s=training.time_budget_s + training.compile_budget_s + training.startup_grace_s)
    val_rows = val_tokens // seq_len if val_tokens is not None else None
    problems = capacity_problems(plan, timeout, train, probe_floor=training.probe_floor, val_rows=val_rows)
    return NightPlan(preset, device, note, plan, timeout, derived, train, problems)
