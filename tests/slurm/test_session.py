"""Research sessions whose experiments run as Slurm jobs on the suite's cluster (tiny CPU preset, real Docker).

One module-scoped session runs on two lanes (two concurrent jobs) while an "administrator" scancels one
candidate's training job mid-run: that experiment must end `preempted` and run again as a new attempt. A
second test SIGKILLs a daemon while its job runs and checks that the restart cancels the orphan job and
redoes the work.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings
from daemon.research.workspace import Workspace
from daemon.store import open_store
from daemon.store.records import ExperimentRecord
from tests.conftest import REPO_ROOT
from tests.e2e.support import handicapped, run_session, tiny_settings
from tests.slurmcluster import PARTITION, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.docker, pytest.mark.slow]
FINISHED = ("kept", "discarded", "measured", "crashed", "timeout", "oom", "invalid")


def slurm_section(cluster: SlurmCluster, tmp_root: Path, max_jobs: int) -> dict[str, Any]:
    return {"shared_dir": cluster.shared, "node_paths": [tmp_root, REPO_ROOT / "trainer"], "partition": PARTITION,
            "account": "lab", "gres": "", "max_jobs": max_jobs, "cpus_per_job": 1, "poll_s": 0.3,
            "time_slack_s": 60, "slurm_conf": cluster.conf, "jobcomp_log": cluster.jobcomp}


def slurm_settings(cluster: SlurmCluster, tmp_root: Path, workspace: Path, data: Path, image: str,
                   max_jobs: int, instance: str) -> Settings:
    settings = tiny_settings(workspace, f"sqlite:///{workspace / 'autoresearch.db'}", data,
                             sandbox={"backend": "slurm", "image": image, "memory_gb": 2},
                             slurm=slurm_section(cluster, tmp_root, max_jobs))
    settings.instance = instance
    return settings


def jobcomp(cluster: SlurmCluster) -> list[dict[str, str]]:
    """Every finished job of the cluster as its jobcomp key/value pairs."""
    from sandbox.slurm.states import parse_pairs

    if not cluster.jobcomp.exists():
        return []
    return [parse_pairs(line) for line in cluster.jobcomp.read_text().splitlines() if line.strip()]


def queued(cluster: SlurmCluster) -> list[tuple[str, str, str]]:
    """(job id, name, state) of every job in the queue."""
    lines = cluster.run("squeue", "-h", "-o", "%i %j %T").stdout.splitlines()
    return [tuple(line.split()) for line in lines if line.strip()]  # type: ignore[misc]


@dataclass
class ClusterSession:
    rows: list[ExperimentRecord]
    status: str
    cancelled_job: str  # name of the job the "administrator" cancelled
    jobs: list[dict[str, str]]  # the jobcomp log after the session
    leftover_dirs: list[str]


@pytest.fixture(scope="module")
def cluster_session(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory, prepared_data: Path,
                    baseline_source: str, trainer_image: str) -> Iterator[ClusterSession]:
    root = tmp_path_factory.mktemp("slurm-session")
    workspace = Workspace.init(root / "ws", baseline_source=handicapped(baseline_source))
    settings = slurm_settings(slurm_cluster, tmp_path_factory.getbasetemp(), workspace.root, prepared_data,
                              trainer_image, max_jobs=2, instance="slurm-e2e")
    cancelled: list[str] = []
    done = threading.Event()

    def administrator() -> None:
        """Once the baseline finished, scancel the first candidate training job seen running."""
        while not done.is_set():
            finished_trains = [j for j in jobcomp(slurm_cluster) if j.get("Name", "").endswith("-train")]
            if finished_trains:
                for job_id, name, state in queued(slurm_cluster):
                    if name.startswith("autoresearch-slurm-e2e-") and name.endswith("-1-train") and state == "RUNNING":
                        time.sleep(3)  # let the container start
                        slurm_cluster.run("scancel", job_id)
                        cancelled.append(name)
                        return
            time.sleep(0.3)

    watcher = threading.Thread(target=administrator, daemon=True)
    watcher.start()
    try:
        summary, rows = run_session(settings, candidates=3)
    finally:
        done.set()
        watcher.join(timeout=10)
    leftovers = sorted(p.name for p in (slurm_cluster.shared / "jobs").glob("autoresearch-slurm-e2e-*"))
    yield ClusterSession(rows, summary.status, cancelled[0] if cancelled else "", jobcomp(slurm_cluster), leftovers)


def test_session_experiments_run_as_slurm_jobs(cluster_session: ClusterSession) -> None:
    """Baseline and candidates finish, each stage of each experiment one completed Slurm job of its own name."""
    rows = cluster_session.rows
    assert rows[0].kind == "baseline" and rows[0].status == "kept" and rows[0].val_bpb is not None
    assert cluster_session.status == "completed"
    names = {j["Name"]: j["JobState"] for j in cluster_session.jobs}
    for row in rows:
        if row.status in ("kept", "discarded", "measured"):
            for stage in ("train", "eval"):
                assert names.get(f"autoresearch-slurm-e2e-{row.id}-{row.attempt}-{stage}") == "COMPLETED", row.id
    assert cluster_session.leftover_dirs == []


def test_each_experiment_stores_its_job_ids(cluster_session: ClusterSession) -> None:
    """experiments.sandbox_jobs names the Slurm job of each stage ("train:<id> eval:<id>"), as Slurm knows them."""
    ids = {j["Name"]: j["JobId"] for j in cluster_session.jobs}
    measured = [r for r in cluster_session.rows if r.status in ("kept", "discarded", "measured")]
    assert measured
    for row in measured:
        prefix = f"autoresearch-slurm-e2e-{row.id}-{row.attempt}"
        assert row.sandbox_jobs == f"train:{ids[prefix + '-train']} eval:{ids[prefix + '-eval']}", row.id


def test_two_lanes_ran_jobs_side_by_side(cluster_session: ClusterSession) -> None:
    """Both cluster lanes ran experiments, and two of the session's jobs overlapped in time."""
    assert {r.lane for r in cluster_session.rows} == {"slurm0", "slurm1"}
    spans = sorted((j["StartTime"], j["EndTime"]) for j in cluster_session.jobs
                   if j.get("Name", "").startswith("autoresearch-slurm-e2e-"))
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans


def test_cancelled_job_is_preempted_and_its_experiment_requeued(cluster_session: ClusterSession) -> None:
    """The experiment whose job an administrator cancelled ends `preempted`; a new attempt of it then finishes."""
    assert cluster_session.cancelled_job, "the administrator never found a running candidate job"
    experiment_id = int(cluster_session.cancelled_job.split("-")[-3])
    by_id = {r.id: r for r in cluster_session.rows}
    preempted = by_id[experiment_id]
    assert preempted.status == "preempted" and "cancelled outside the daemon" in preempted.error
    retries = [r for r in cluster_session.rows if r.source_hash == preempted.source_hash and r.id != preempted.id]
    assert retries and retries[-1].attempt == preempted.attempt + 1 and retries[-1].status in FINISHED
    states = [j["JobState"] for j in cluster_session.jobs if j["Name"] == cluster_session.cancelled_job]
    assert states == ["CANCELLED"], "Slurm must not have rerun the cancelled job by itself"


def test_daemon_sigkill_then_restart_cancels_the_orphan_job(slurm_cluster: SlurmCluster,
                                                            tmp_path_factory: pytest.TempPathFactory,
                                                            prepared_data: Path, baseline_source: str,
                                                            trainer_image: str) -> None:
    """A daemon SIGKILLed while its job runs: the restart cancels the job, records `interrupted`, redoes the run."""
    root = tmp_path_factory.mktemp("slurm-sigkill")
    workspace = Workspace.init(root / "ws", baseline_source=baseline_source)
    settings = slurm_settings(slurm_cluster, tmp_path_factory.getbasetemp(), workspace.root, prepared_data,
                              trainer_image, max_jobs=1, instance="slurm-kill")
    env = {"PATH": os.environ["PATH"], **slurm_cluster.env, **_settings_env(settings)}
    exe = str(REPO_ROOT / ".venv" / "bin" / "autoresearch")
    daemon = subprocess.Popen([exe, "once", "-n", "0"], cwd=workspace.root, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    orphan = ""
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not orphan:
            orphan = next((name for _, name, state in queued(slurm_cluster)
                           if name.startswith("autoresearch-slurm-kill-") and state == "RUNNING"), "")
            time.sleep(0.3)
        assert orphan, "the daemon never got a job running"
        daemon.send_signal(signal.SIGKILL)
    finally:
        daemon.wait(timeout=30)
    assert orphan in [name for _, name, _ in queued(slurm_cluster)], "the job must outlive the killed daemon"
    restarted = subprocess.run([exe, "once", "-n", "0"], cwd=workspace.root, env=env, text=True,
                               capture_output=True, timeout=600, check=False)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"{orphan}: killed" in restarted.stderr + restarted.stdout
    assert [j["JobState"] for j in jobcomp(slurm_cluster) if j["Name"] == orphan] == ["CANCELLED"]
    store = open_store(settings.database_url)
    try:
        rows = sorted(store.list_experiments(limit=100), key=lambda r: r.id)
    finally:
        store.close()
    assert rows[0].status == "interrupted"
    assert (rows[1].kind, rows[1].status, rows[1].attempt) == ("baseline", "kept", 2)


def _settings_env(settings: Settings) -> dict[str, str]:
    """The settings as AUTORESEARCH_* variables for the real CLI (nested lists as JSON)."""
    env = {"AUTORESEARCH_WORKSPACE": str(settings.workspace), "AUTORESEARCH_INSTANCE": settings.instance_name}
    sections = {"database": settings.database, "data": settings.data, "sandbox": settings.sandbox,
                "training": settings.training, "judge": settings.judge, "metrics": settings.metrics,
                "slurm": settings.slurm}
    for name, section in sections.items():
        for key, value in section.model_dump(mode="json", exclude_none=True).items():
            shown = json.dumps(value) if isinstance(value, list | dict) else str(value)
            env[f"AUTORESEARCH_{name.upper()}__{key.upper()}"] = shown
    env["AUTORESEARCH_AGENT__PROVIDER"] = "offline"
    return env
