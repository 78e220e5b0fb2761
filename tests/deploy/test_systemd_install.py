"""The systemd unit (systemd-analyze verify) and deploy/install.sh (dry run, real run into a temporary root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import SchedulerConfig, load_settings

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "autoresearch.service"
INSTALL = REPO / "deploy" / "install.sh"
EXEC_START = "/opt/autoresearch/venv/bin/autoresearch"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="install.sh changes ownership: run as root")
needs_analyzer = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                    reason="no systemd-analyze: apt-get install systemd")


def _unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _verify_problems(unit: Path) -> list[str]:
    """`systemd-analyze verify` complaints, less the one about the venv not being installed on this machine."""
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return [line for line in lines if f"Command {EXEC_START} is not executable" not in line]


def _install(*args: str, root: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["bash", str(INSTALL), *args]
    if root is not None:
        argv += ["--root", str(root)]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300,
                          env={**os.environ, **(env or {})})


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\ndocker:x:4242:\n")
    (root / "etc" / "shadow").write_text("")
    (root / "etc" / "gshadow").write_text("")
    return root


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built offline from a copy (the repository itself gets no build/ folder)."""
    return _wheel(tmp_path_factory, "")


def _wheel(tmp_path_factory: pytest.TempPathFactory, tag: str, extra: dict[str, str] | None = None) -> Path:
    """A wheel of a copy of this checkout, with `extra` files (path -> text) added to the copy."""
    src = tmp_path_factory.mktemp(f"src{tag}")
    for name in ("pyproject.toml", "daemon", "sandbox", "trainer"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, src / name)
    for relative, text in (extra or {}).items():
        (src / relative).write_text(text)
    out = tmp_path_factory.mktemp(f"wheel{tag}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    return next(out.glob("*.whl"))


# pip reads these: install only our wheel, no dependencies, no index (the test must not download torch).
OFFLINE_PIP = {"PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1"}


@needs_analyzer
def test_unit_passes_systemd_analyze_verify() -> None:
    """systemd-analyze verify finds nothing wrong with the unit (beyond the venv missing on this machine)."""
    assert _verify_problems(UNIT) == []


def test_unit_has_the_required_service_settings() -> None:
    """Type=notify with watchdog, restart on failure, stop timeout over the grace period, hardening, credentials."""
    settings = _unit_settings(UNIT)
    assert settings["Type"] == ["notify"]
    assert settings["ExecStart"] == [f"{EXEC_START} --config /etc/autoresearch/autoresearch.toml run"]
    assert settings["Restart"] == ["on-failure"]
    assert "WatchdogSec" in settings
    grace_s = SchedulerConfig().grace_s
    assert int(settings["TimeoutStopSec"][0]) > grace_s
    assert settings["User"] == ["autoresearch"] and settings["SupplementaryGroups"] == ["docker"]
    assert settings["ProtectSystem"] == ["strict"] and settings["ReadWritePaths"] == ["/var/lib/autoresearch"]
    assert "AF_UNIX" in settings["RestrictAddressFamilies"][0].split()
    assert settings["LoadCredential"] == ["anthropic_api_key:/etc/autoresearch/credentials/anthropic_api_key"]
    assert "AUTORESEARCH_AGENT__API_KEY_FILE=%d/anthropic_api_key" in settings["Environment"]
    for flag in ("ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert settings[flag] == ["yes"], flag


def test_config_template_loads_with_the_real_settings() -> None:
    """deploy/autoresearch.toml.example is a valid config, and its grace period matches the unit's stop timeout."""
    settings = load_settings(REPO / "deploy" / "autoresearch.toml.example")
    assert str(settings.workspace).startswith("/var/lib/autoresearch")
    assert settings.metrics.port == 9464
    assert int(_unit_settings(UNIT)["TimeoutStopSec"][0]) == int(settings.scheduler.grace_s) + 60


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    """--dry-run lists user, dirs, venv, unit and enable, and leaves the target root untouched."""
    root = _fake_root(tmp_path)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    done = _install("--dry-run", root=root)
    assert done.returncode == 0, done.stderr
    for expected in ("would run: useradd", "would run: usermod", "venv", "autoresearch.service",
                     "enable autoresearch.service", "nothing was changed"):
        assert expected in done.stdout, expected
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert (root / "etc" / "passwd").read_text() == "root:x:0:0:root:/root:/bin/bash\n"


def test_unknown_option_is_refused_with_a_hint(tmp_path: Path) -> None:
    """A mistyped option fails before doing anything and says where to look."""
    done = _install("--dryrun", root=_fake_root(tmp_path))
    assert done.returncode != 0
    assert "unknown option '--dryrun'" in done.stderr and "what to do" in done.stderr


def test_missing_docker_group_is_refused_with_a_hint(tmp_path: Path) -> None:
    """Without Docker installed (no docker group) the installer stops and says to install Docker first."""
    root = _fake_root(tmp_path)
    (root / "etc" / "group").write_text("root:x:0:\n")
    done = _install("--dry-run", root=root)
    assert done.returncode != 0 and "install Docker first" in done.stderr


@needs_root
@needs_analyzer
def test_install_into_a_root_then_rerun_is_idempotent(tmp_path: Path, project_wheel: Path) -> None:
    """A real install creates user, dirs, config, venv, unit and enables it; a second run changes nothing."""
    root = _fake_root(tmp_path)
    first = _install("--package", str(project_wheel), root=root, env=OFFLINE_PIP)
    assert first.returncode == 0, first.stdout + first.stderr

    passwd = (root / "etc" / "passwd").read_text()
    assert "autoresearch:" in passwd and "/usr/sbin/nologin" in passwd
    assert "docker:x:4242:autoresearch" in (root / "etc" / "group").read_text()
    assert (root / "etc/autoresearch/autoresearch.toml").read_text() == \
        (REPO / "deploy/autoresearch.toml.example").read_text()
    assert oct((root / "etc/autoresearch/credentials").stat().st_mode)[-3:] == "700"
    assert (root / "opt/autoresearch/venv/bin/autoresearch").exists()
    unit = root / "etc/systemd/system/autoresearch.service"
    assert unit.read_text() == UNIT.read_text()
    documentation = _unit_settings(UNIT)["Documentation"][0]
    assert documentation.startswith("file:///") and (root / documentation.removeprefix("file:///")).is_file(), \
        "Documentation= must name a file install.sh installs"
    assert (root / "etc/systemd/system/multi-user.target.wants/autoresearch.service").is_symlink()
    # No API key installed: the drop-in turns the credential off, and the unit still verifies with it.
    assert (root / "etc/systemd/system/autoresearch.service.d/10-no-api-key.conf").exists()
    assert _verify_problems(unit) == []

    second = _install("--package", str(project_wheel), root=root, env=OFFLINE_PIP)
    assert second.returncode == 0, second.stderr
    assert "run:" not in second.stdout and "write " not in second.stdout
    assert "ok: package already installed" in second.stdout


@needs_root
def test_installing_an_api_key_removes_the_offline_drop_in(tmp_path: Path, project_wheel: Path) -> None:
    """Once the key file exists, a re-run removes the no-key drop-in so LoadCredential takes effect."""
    root = _fake_root(tmp_path)
    assert _install("--package", str(project_wheel), root=root, env=OFFLINE_PIP).returncode == 0
    key = root / "etc/autoresearch/credentials/anthropic_api_key"
    key.write_text("sk-test\n")
    done = _install("--package", str(project_wheel), root=root, env=OFFLINE_PIP)
    assert done.returncode == 0, done.stderr
    assert not (root / "etc/systemd/system/autoresearch.service.d/10-no-api-key.conf").exists()
    assert key.read_text() == "sk-test\n"


@pytest.fixture(scope="module")
def next_wheel(tmp_path_factory: pytest.TempPathFactory, project_wheel: Path) -> Path:
    """A second, different wheel of this checkout (one more module): what an upgrade installs."""
    return _wheel(tmp_path_factory, "-next",
                  {"daemon/_next_release.py": '"""Marks the next release in the upgrade test."""\n'})


def _site(venv: Path) -> Path:
    return next(venv.glob("lib/python*/site-packages"))


@needs_root
def test_upgrade_installs_beside_the_running_version_and_records_it(tmp_path: Path, project_wheel: Path,
                                                                      next_wheel: Path) -> None:
    """An upgrade installs into a new versioned venv, then moves the link; the old venv stays intact."""
    root = _fake_root(tmp_path)
    assert _install("--package", str(project_wheel), root=root, env=OFFLINE_PIP).returncode == 0
    opt = root / "opt/autoresearch"
    first = (opt / "venv").resolve()
    done = _install("--package", str(next_wheel), root=root, env=OFFLINE_PIP)
    assert done.returncode == 0, done.stdout + done.stderr
    second = (opt / "venv").resolve()
    assert first != second and (opt / "venv").is_symlink()
    assert (_site(second) / "daemon" / "_next_release.py").exists()
    assert not (_site(first) / "daemon" / "_next_release.py").exists(), "the old version is untouched"
    assert (opt / "previous").read_text().strip() == first.name
    shebang = (first / "bin" / "autoresearch").read_text().splitlines()[0]
    assert shebang.startswith(f"#!{first}/bin/python"), "the previous version still runs from its own folder"
    assert f"upgraded from {first.name}" in done.stdout


@needs_root
def test_rollback_plan_migrates_down_then_moves_the_link_back(tmp_path: Path, project_wheel: Path,
                                                              next_wheel: Path) -> None:
    """--rollback (dry run) migrates the database down to the previous version's head, then relinks."""
    from daemon.store.migrate import head_revision

    root = _fake_root(tmp_path)
    assert _install("--package", str(project_wheel), root=root, env=OFFLINE_PIP).returncode == 0
    first = (root / "opt/autoresearch/venv").resolve().name
    assert _install("--package", str(next_wheel), root=root, env=OFFLINE_PIP).returncode == 0
    done = _install("--rollback", "--dry-run", root=root)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    downgrade = next(i for i, line in enumerate(lines)
                     if "db\\ downgrade" in line and line.endswith(f" {head_revision()}"))
    relink = next(i for i, line in enumerate(lines) if "ln -sfn" in line and first in line)
    assert downgrade < relink


def test_rollback_without_an_upgrade_is_refused(tmp_path: Path) -> None:
    """--rollback with no recorded previous version says so and changes nothing."""
    root = _fake_root(tmp_path)
    done = _install("--rollback", "--dry-run", root=root)
    assert done.returncode == 1 and "no previous version recorded" in done.stderr


def test_unit_and_readme_state_the_same_minimum_systemd_version() -> None:
    """The unit states the minimum systemd (>= 248, LoadCredential with %d), and deploy/README.md says the same."""
    import re

    stated = re.search(r"Needs systemd >= (\d+)", UNIT.read_text())
    assert stated is not None and int(stated.group(1)) >= 248
    assert f"systemd >= {stated.group(1)}" in (REPO / "deploy" / "README.md").read_text()
