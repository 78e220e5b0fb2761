"""The cost model: eval sizing per night, the derived eval timeout, and the start-up refusal of what cannot fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.errors import ConfigError
from daemon.research import cost_model
from daemon.research.cost_model import (
    CPU_SCHEME,
    DEVICES,
    GPU_EVAL_TOKENS,
    NEW_GPU_SCHEME,
    OLD_GPU_SCHEME,
    cpu_class,
    host_bytes_per_token,
    plan_night,
    project_eval,
    size_eval,
)
from daemon.research.workspace import Workspace
from daemon.service.runtime import night_plan, open_runtime, sandbox_env
from sandbox.gpu import GpuInfo, NoGpuProbe
from trainer.probe_power import FLOOR_ENV, detection_probability, rows_needed

H100 = "NVIDIA H100 80GB HBM3"


class FakeNvml:
    """NVML at the edge: the GPUs a lab server would list (no GPU here)."""

    def __init__(self, *names: str) -> None:
        self.names = names

    def gpus(self) -> list[GpuInfo]:
        return [GpuInfo(f"GPU-{i}", i, name, 0.0, 81559.0, 0.0) for i, name in enumerate(self.names)]

    def foreign_processes(self, uuid: str, own_pids: object) -> list[int]:
        return []


def test_memfd_host_bytes_follow_the_arithmetic() -> None:
    """memfd: 2 passes x (int64 in and out of host memory + fp32 logits in and out): ~131 kB at vocab 8192."""
    assert host_bytes_per_token("memfd", 8192, 2048) == 2 * (2 * 8 + 2 * 4 * 8192) == 131104
    assert host_bytes_per_token("device", 8192, 2048) <= 1024


def test_device_transport_brings_the_h100_eval_under_five_percent() -> None:
    """Upstream's eval size on an H100: the old memfd path takes minutes, the device path under 15 s."""
    old = project_eval(GPU_EVAL_TOKENS, DEVICES["H100"], OLD_GPU_SCHEME, "gpu", 8192, 2048)
    new = project_eval(GPU_EVAL_TOKENS, DEVICES["H100"], NEW_GPU_SCHEME, "gpu", 8192, 2048)
    assert old.seconds > 200 and new.seconds <= 0.1 * 300
    assert new.parts["transfer"] < 0.01 < old.parts["transfer"]


def test_gpu_night_scores_upstreams_eval_size() -> None:
    """An H100 night at the gpu preset and 300 s scores 40 x 2^19 tokens, within 10% of the budget."""
    plan = size_eval(budget_s=300, device=DEVICES["H100"], scheme=NEW_GPU_SCHEME, preset="gpu", vocab=8192,
                     seq_len=2048)
    assert plan.tokens == GPU_EVAL_TOKENS and plan.budget_share <= 0.10 and plan.note == ""


def test_short_gpu_budget_shrinks_the_eval_to_its_share() -> None:
    """At a 60 s budget the GPU eval shrinks to about 10% of it, still above the probe floor."""
    plan = size_eval(budget_s=60, device=DEVICES["H100"], scheme=NEW_GPU_SCHEME, preset="gpu", vocab=8192,
                     seq_len=2048)
    assert plan.tokens < GPU_EVAL_TOKENS and plan.budget_share <= 0.10 + 1e-9
    assert plan.rows >= plan.probe_rows and plan.probe_power >= 0.99


def test_cpu_night_probe_floor_wins_and_says_the_share() -> None:
    """On 2 CPU cores the 10% share is too small for the probe: the floor wins, the note gives the share."""
    plan = size_eval(budget_s=300, device=cpu_class(2), scheme=CPU_SCHEME, preset="cpu", vocab=8192, seq_len=1024)
    assert plan.rows == rows_needed(vocab_size=8192) and plan.probe_power >= 0.99
    assert "probe floor wins" in plan.note and f"{plan.budget_share:.0%}" in plan.note
    assert plan.budget_share > 0.10


def test_sampling_error_is_small_against_the_judge_sigma() -> None:
    """Every sized eval keeps SE_diff = s_d / sqrt(rows) within half the judge's sigma."""
    for budget in (30.0, 300.0, 3000.0):
        for device, scheme, preset, seq in ((DEVICES["H100"], NEW_GPU_SCHEME, "gpu", 2048),
                                            (cpu_class(4), CPU_SCHEME, "cpu", 1024)):
            plan = size_eval(budget_s=budget, device=device, scheme=scheme, preset=preset, vocab=8192, seq_len=seq)
            assert plan.sampling_se <= cost_model.SAMPLING_RATIO * plan.judge_sigma + 1e-12
            assert math.isclose(plan.sampling_se, cost_model.ROW_DIFF_SD_BPB / math.sqrt(plan.rows))


def test_explicit_eval_below_the_probe_floor_is_refused(tmp_path: Path) -> None:
    """training.eval_tokens that scores too few rows is one problem with the numbers and the fix."""
    settings = load_settings(None, workspace=tmp_path, training={"eval_tokens": 64 * 1024})
    plan = plan_night(settings, [], 2.0)
    [(problem, fix)] = plan.problems
    assert "64 rows" in problem and f"{detection_probability(64, vocab_size=8192):.2f}" in problem
    assert f"{rows_needed(vocab_size=8192) * 1024}" in fix


def test_probe_floor_off_allows_a_small_eval_and_tells_the_eval_stage(tmp_path: Path) -> None:
    """With probe_floor false a 2-row eval plans fine, and the eval stage is told not to refuse it."""
    settings = load_settings(None, workspace=tmp_path, training={"eval_tokens": 2048, "probe_floor": False})
    plan = plan_night(settings, [], 2.0)
    assert plan.problems == []
    env = sandbox_env(settings, plan)
    assert env[FLOOR_ENV] == "0" and env["AUTORESEARCH_EVAL_TOKENS"] == "2048"


def test_eval_timeout_is_derived_and_a_set_one_that_cannot_fit_is_refused(tmp_path: Path) -> None:
    """eval_timeout_s 0 derives a limit above the projection; a set limit below it is a problem."""
    derived = plan_night(load_settings(None, workspace=tmp_path), [], 2.0)
    assert derived.timeout_derived and derived.eval_timeout_s >= 2 * derived.eval.seconds
    tight = plan_night(load_settings(None, workspace=tmp_path, sandbox={"eval_timeout_s": 30}), [], 2.0)
    [(problem, fix)] = tight.problems
    assert "eval_timeout_s = 30" in problem and "eval_timeout_s = 0" in fix


def test_old_transport_on_an_a100_cannot_fit_the_old_timeout() -> None:
    """The eval the daemon ran before (40 x 2^19 tokens through memfd) overruns 300 s on an A100."""
    plan = size_eval(budget_s=300, device=DEVICES["A100"], scheme=OLD_GPU_SCHEME, preset="gpu", vocab=8192,
                     seq_len=2048, explicit_tokens=GPU_EVAL_TOKENS)
    train = cost_model.project_train(budget_s=300, compile_budget_s=120, device=DEVICES["A100"], limit_s=540)
    problems = cost_model.capacity_problems(plan, 300.0, train, probe_floor=True)
    assert len(problems) == 1 and "over sandbox.eval_timeout_s = 300" in problems[0][0]


def test_gpu_names_from_nvml_pick_the_device_class(tmp_path: Path) -> None:
    """An H100 from NVML plans as H100; an unknown GPU as the slowest known class, saying so."""
    settings = load_settings(None, workspace=tmp_path)
    assert night_plan(settings, FakeNvml(H100)).device.name == "H100"
    unknown = night_plan(settings, FakeNvml("Tesla V100-SXM2-16GB"))
    assert unknown.device.name == cost_model.slowest_gpu().name and "not known" in unknown.device_note
    assert night_plan(settings, NoGpuProbe()).device.kind == "cpu"


def test_scoring_length_matches_the_trainer() -> None:
    """The cost model's scoring length is trainer.prepare.scoring_seq_len for every preset and device."""
    from trainer.prepare import scoring_seq_len

    for preset in ("auto", "gpu", "cpu", "tiny"):
        for cuda in (False, True):
            assert cost_model.scoring_length(preset, cuda) == scoring_seq_len(preset, cuda)


def test_val_split_too_small_for_the_probe_is_refused(tmp_path: Path, prepared_data: Path) -> None:
    """A prepared val split with fewer rows than the probe floor is refused before any run."""
    settings = load_settings(None, workspace=tmp_path, data={"dir": prepared_data})
    problems = plan_night(settings, [], 2.0).problems
    assert any("val split holds about" in problem for problem, _fix in problems)


def test_startup_refuses_what_cannot_fit(tmp_path: Path, prepared_data: Path, baseline_source: str) -> None:
    """open_runtime (run / once / try) raises ConfigError (exit 2) with the numbers and the fix."""
    workspace = Workspace.init(tmp_path / "ws", baseline_source=baseline_source)
    settings = load_settings(None, workspace=workspace.root, data={"dir": prepared_data}, sandbox={"backend": "local"},
                             training={"preset": "tiny", "eval_tokens": 2048}, agent={"provider": "offline"},
                             metrics={"port": 0})
    with pytest.raises(ConfigError) as caught:
        open_runtime(settings, daemon=False, probe=NoGpuProbe(), serve_http=False)
    assert caught.value.exit_code == 2
    assert "2 rows" in str(caught.value) and "training.eval_tokens >=" in caught.value.hint


def test_train_stage_that_cannot_fit_its_limit_is_refused(tmp_path: Path) -> None:
    """A start-up grace too short for start-up and export is a problem naming the parts and the fix."""
    settings = load_settings(None, workspace=tmp_path, training={"startup_grace_s": 5})
    problems = plan_night(settings, [], 2.0).problems
    assert any("train stage is projected" in problem and "startup_grace_s" in fix for problem, fix in problems)
