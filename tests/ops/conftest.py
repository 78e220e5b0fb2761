"""A store holding one short research session, filled through the real Store API (SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.store import AgentCallRecord, Store, open_store

BASELINE_SOURCE = "import torch\nLR = 0.04\nDEPTH = 8\n"


@dataclass(frozen=True)
class FilledSession:
    store: Store
    session_id: int
    best_id: int
    baseline_id: int


def run_experiment(store: Store, session_id: int, kind: str, source: str, final: str, *, val_bpb: float | None = None,
         description: str = "", diff: str = "", seed: int = 0, parent_id: int | None = None,
         lane: str = "gpu0", gpu_uuid: str | None = "GPU-0000", steps: int = 100) -> int:
    """One experiment through its real life cycle: queued, claimed, (evaluating), final status."""
    created = store.create_experiment(session_id, kind, source, parent_id=parent_id, description=description,
                                      diff=diff, seed=seed)
    claimed = store.claim_next(session_id, "test-host:1", lane, gpu_uuid, lease_seconds=600)
    assert claimed is not None and claimed.id == created.id
    if final in ("crashed", "timeout", "oom"):
        store.transition(created.id, "running", final, exit_code=1, error=f"{final} in train stage",
                         log_tail="Traceback ...\nRuntimeError: boom")
        return created.id
    store.transition(created.id, "running", "evaluating", training_seconds=60.0, peak_vram_mb=2048.0,
                     num_steps=steps)
    store.transition(created.id, "evaluating", final, val_bpb=val_bpb, probe="passed", exit_code=0,
                     commit=f"{created.id:07x}" if final == "kept" else "")
    return created.id


def fill_short_session(store: Store) -> FilledSession:
    """Baseline, two noise runs, kept/discarded candidates, a crash, a timeout and a confirm; two agent calls."""
    session = store.create_session("nov04", "window", "# program\n", {"training": {"time_budget_s": 60}})
    sid = session.id
    baseline_id = run_experiment(store, sid, "baseline", BASELINE_SOURCE, "kept", val_bpb=1.2000, description="baseline")
    for seed, value in ((1, 1.2010), (2, 1.1995)):
        noise_id = run_experiment(store, sid, "noise", BASELINE_SOURCE, "measured", val_bpb=value, seed=seed,
                        description="baseline (noise)")
        store.add_noise(sid, noise_id, value, seed)
    store.add_noise(sid, baseline_id, 1.2000, 0)
    run_experiment(store, sid, "candidate", BASELINE_SOURCE.replace("0.04", "0.08"), "discarded", val_bpb=1.2100,
         description="double the learning rate", parent_id=baseline_id)
    first_kept = run_experiment(store, sid, "candidate", BASELINE_SOURCE.replace("0.04", "0.03"), "kept", val_bpb=1.1800,
                      description="lower LR to 0.03 <script>alert('x')</script> | pipes",
                      diff="-LR = 0.04\n+LR = 0.03\n", parent_id=baseline_id)
    run_experiment(store, sid, "candidate", "import torch\nraise SystemExit(1)\n", "crashed", description="broken idea",
         parent_id=first_kept)
    run_experiment(store, sid, "candidate", BASELINE_SOURCE + "# slow\n", "timeout", description="too slow",
         parent_id=first_kept)
    run_experiment(store, sid, "confirm", BASELINE_SOURCE.replace("0.04", "0.03"), "measured", val_bpb=1.1810,
         description="confirm lower LR", seed=3)
    best_source = BASELINE_SOURCE.replace("0.04", "0.03").replace("DEPTH = 8", "DEPTH = 10")
    best_id = run_experiment(store, sid, "candidate", best_source, "kept", val_bpb=1.1650,
                   description="deeper model (depth 10)",
                   diff="-LR = 0.04\n+LR = 0.03\n-DEPTH = 8\n+DEPTH = 10\n```\n", parent_id=first_kept)
    run_experiment(store, sid, "candidate", best_source.replace("10", "12"), "discarded", val_bpb=1.1700,
         description="depth 12", parent_id=best_id, lane="gpu1", gpu_uuid="GPU-0001")
    for cost in (0.25, 0.5):
        store.record_agent_call(AgentCallRecord(provider="anthropic", model="claude-sonnet-5-5", input_tokens=1000,
                                                output_tokens=200, cost_usd=cost, latency_s=10.0, session_id=sid))
    return FilledSession(store, sid, best_id, baseline_id)


@pytest.fixture(scope="module")
def filled_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FilledSession]:
    path: Path = tmp_path_factory.mktemp("ops-store") / "autoresearch.db"
    store = open_store(f"sqlite:///{path}")
    store.upgrade()
    try:
        yield fill_short_session(store)
    finally:
        store.close()
