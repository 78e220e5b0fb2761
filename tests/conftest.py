"""Shared fixtures and the service-marker policy.

The suite owns its services: Postgres is a cluster of its own (tests/pgcluster.py: initdb in a temp dir,
a free port, stopped at the end), never the host's; Prometheus and Alertmanager run on free ports.

A test marked `docker`, `postgres`, `prometheus`, `chromium` or `gpu` needs that service. When it is
missing the test is skipped with the reason on a developer's machine, but fails under CI (CI=true),
where `make test` has set every service up (except a GPU, which CI never has: gpu tests always skip).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgcluster import PgCluster, PgClusterError

REPO_ROOT = Path(__file__).resolve().parent.parent
# An external server for the suite (its admin URL), instead of the cluster the suite starts for itself.
EXTERNAL_PG_URL = os.environ.get("AUTORESEARCH_TEST_PG")
_SUITE_CLUSTER: list[PgCluster] = []


@functools.cache
def _docker_reason() -> str | None:
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
        client.close()
    except Exception as exc:  # any failure means "no engine"
        return f"no Docker engine answers ({type(exc).__name__}); run `make services`"
    return None


def suite_cluster() -> PgCluster | None:
    """The suite's own Postgres cluster, started on first use (None when AUTORESEARCH_TEST_PG names a server)."""
    if EXTERNAL_PG_URL:
        return None
    if not _SUITE_CLUSTER:
        cluster = PgCluster()
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        _SUITE_CLUSTER.append(cluster)
    return _SUITE_CLUSTER[0]


def pg_admin_url() -> str:
    """Admin URL (database `postgres`) of the server the suite uses: its own cluster, never the host's."""
    cluster = suite_cluster()
    return EXTERNAL_PG_URL if cluster is None else cluster.admin_url  # type: ignore[return-value]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the suite's cluster (pytest runs this on Ctrl-C too; a watcher covers a killed pytest) and remove the
    untagged leftovers of the trainer image builds (tagged images stay: they are reused by the next run)."""
    while _SUITE_CLUSTER:
        _SUITE_CLUSTER.pop().stop()
    if _docker_reason() is None:
        import docker

        from sandbox.prune import prune_images

        client = docker.from_env(timeout=60)
        try:
            prune_images(client, keep=10**6)  # keeps every tagged image: only dangling build leftovers go
        except Exception as exc:  # housekeeping never fails the run
            print(f"note: removing untagged build leftovers failed: {exc}")
        finally:
            client.close()


@functools.cache
def _postgres_reason() -> str | None:
    import sqlalchemy

    try:
        url = pg_admin_url()
    except PgClusterError as exc:
        return f"could not start the suite's own Postgres cluster: {exc}"
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except Exception as exc:  # refused, missing role...
        return f"PostgreSQL not reachable at {url} ({type(exc).__name__})"
    return None


@functools.cache
def _prometheus_reason() -> str | None:
    missing = [b for b in ("prometheus", "promtool", "amtool") if shutil.which(b) is None]
    if shutil.which("prometheus-alertmanager") is None and shutil.which("alertmanager") is None:
        missing.append("alertmanager")
    return (f"missing {', '.join(missing)}: `make services` (apt-get install --no-install-recommends "
            "prometheus prometheus-alertmanager)") if missing else None


@functools.cache
def _chromium_reason() -> str | None:
    return None if shutil.which("chromium") else "no chromium: apt-get install chromium"


@functools.cache
def _slurm_reason() -> str | None:
    from tests.slurmcluster import missing_reason

    return missing_reason()


@functools.cache
def _gpu_reason() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        pass
    return "no CUDA GPU on this machine"


_SERVICE_CHECKS = {
    "docker": _docker_reason,
    "postgres": _postgres_reason,
    "prometheus": _prometheus_reason,
    "chromium": _chromium_reason,
    "gpu": _gpu_reason,
    "slurm": _slurm_reason,
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    for marker, check in _SERVICE_CHECKS.items():
        if item.get_closest_marker(marker) is None:
            continue
        reason = check()
        if reason is None:
            continue
        if in_ci and marker != "gpu":
            pytest.fail(f"CI must provide {marker}: {reason}")
        pytest.skip(reason)


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new, empty Postgres database named `<prefix>_<random>`, dropped (even if still in use) on exit."""
    import sqlalchemy

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    # pre-ping: the store's restart test restarts Postgres, killing this engine's pooled connection
    admin_url = pg_admin_url()
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty Postgres database for this test run, dropped afterwards."""
    if (reason := _postgres_reason()) is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    with scratch_database("autoresearch_test") as url:
        yield url


@pytest.fixture(scope="session")
def postgres_cluster(postgres_url: str) -> PgCluster:
    """The suite's own cluster, for tests that restart Postgres (skips when the suite uses an external server)."""
    cluster = suite_cluster()
    if cluster is None:
        pytest.skip("AUTORESEARCH_TEST_PG names an external server: the suite restarts only a cluster it owns")
    return cluster


@pytest.fixture()
def run_cli(tmp_path: Path):
    """Run the real `autoresearch` console script in a subprocess; returns CompletedProcess."""

    def _run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
        full_env.update(env or {})
        exe = Path(os.sys.executable).parent / "autoresearch"
        return subprocess.run([str(exe), *args], cwd=cwd or tmp_path, env=full_env, text=True,
                              capture_output=True, timeout=timeout, check=False)

    return _run


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DATA_DIR (train/ and val/ splits, vocab 512) prepared from ~2.5 MB of small stdlib files: about 50
    val documents, so that the eval's BOS-aligned rows (one document start each) number about 40."""
    import sysconfig

    from trainer.prepare import prepare_data

    corpus = tmp_path_factory.mktemp("corpus")
    copied = 0
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or not 1000 <= path.stat().st_size <= 10_000:
            continue  # many small files give the val split enough documents
        shutil.copy(path, corpus / "_".join(path.relative_to(root).parts))
        copied += path.stat().st_size
        if copied > 2_500_000:
            break
    return prepare_data(str(corpus), tmp_path_factory.mktemp("data"), vocab_size=512, progress=lambda _: None)


@pytest.fixture(scope="session")
def baseline_source() -> str:
    """The text of the baseline candidate, trainer/train.py."""
    return (REPO_ROOT / "trainer" / "train.py").read_text()


@pytest.fixture(scope="session")
def trainer_image() -> str:
    """The offline CPU trainer image (built once per input hash, then cached); skips without Docker."""
    if (reason := _docker_reason()) is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)
        pytest.skip(reason)
    from sandbox.images import ensure_offline_image

    return ensure_offline_image()
