"""The host of a Docker or Slurm install has no torch: the service installs, imports, prepares data and
answers without it; only the local backend asks for it (the `local` extra)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
# Run Python as if torch were not installed: `import torch` raises ImportError in that process.
NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def _python(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    return subprocess.run([sys.executable, "-c", NO_TORCH + textwrap.dedent(code)], cwd=tmp_path, text=True,
                          capture_output=True, timeout=600, check=False,
                          env={**clean, "PYTHONPATH": str(REPO), **(env or {})})


def test_torch_is_not_a_dependency_of_the_service() -> None:
    """`pip install autoresearch-daemon` pulls no torch: it is only in the `local` (and `dev`) extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [dep for dep in project["dependencies"] if dep.startswith("torch")]
    assert [dep for dep in project["optional-dependencies"]["local"] if dep.startswith("torch")]


def test_every_service_module_imports_without_torch(tmp_path: Path) -> None:
    """Every module of daemon/ and sandbox/ (and the trainer parts the host uses) imports with no torch."""
    done = _python("""
        import importlib, pkgutil
        import daemon, sandbox
        failed = []
        for package in (daemon, sandbox):
            for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                if ".migrations" in info.name or info.name.endswith("__main__"):
                    continue
                try:
                    importlib.import_module(info.name)
                except ImportError as exc:
                    failed.append(f"{info.name}: {exc}")
        for name in ("trainer.prepare", "trainer.compile_cache", "trainer.layout"):
            importlib.import_module(name)
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
    """, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prepare_runs_on_a_host_without_torch(tmp_path: Path) -> None:
    """`autoresearch prepare` of a small local corpus works with no torch on the host."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"document {i}\n" + "the quick brown fox jumps over the lazy dog " * 30)
    done = _python(f"""
        from daemon.cli import main
        sys.exit(main(["prepare", "--source", {str(corpus)!r}, "--vocab-size", "300"]))
    """, tmp_path, env={"AUTORESEARCH_WORKSPACE": str(tmp_path / "ws"), "AUTORESEARCH_METRICS__PORT": "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "data ready:" in done.stdout


def test_the_local_backend_without_torch_says_what_to_install(tmp_path: Path) -> None:
    """Choosing the local backend on a host without torch is a config error naming the `local` extra."""
    done = _python("""
        from daemon.config import load_settings
        from daemon.errors import ConfigError
        from daemon.service.runtime import choose_backend
        try:
            choose_backend(load_settings(), daemon=False)
        except ConfigError as exc:
            print(exc, exc.hint)
            sys.exit(3)
    """, tmp_path, env={"AUTORESEARCH_SANDBOX__BACKEND": "local"})
    assert done.returncode == 3, done.stdout + done.stderr
    assert "autoresearch-daemon[local]" in done.stdout


@pytest.mark.parametrize("backend", ["docker", "slurm"])
def test_doctor_does_not_ask_for_torch_with_an_image_backend(backend: str) -> None:
    """doctor's torch check passes on a host without torch when the trainer image trains."""
    from daemon.cli.doctor import OK

    code = f"""
        from daemon.cli.doctor import check_torch
        check = check_torch({backend!r})
        print(check.verdict, check.detail)
    """
    done = _python(code, REPO)
    assert done.stdout.startswith(OK) and "not needed" in done.stdout, done.stdout + done.stderr
