"""The trainer image recipe: one Dockerfile, hashed plans per variant/base/index, wheel caching, variant choice."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest

from sandbox import images
from sandbox.errors import ImageError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cpu_wheel_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A wheel folder holding a (fake, never installed) torch CPU wheel, and a private cache folder."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / f"torch-{images.TORCH_VERSION}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    monkeypatch.setenv("AUTORESEARCH_WHEEL_DIR", str(wheels))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    return wheels


def _fake_torch_wheel(folder: Path, cuda: str | None) -> Path:
    path = folder / f"torch-{images.TORCH_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("torch/version.py", f"__version__ = '{images.TORCH_VERSION}'\n"
                       f"cuda: Optional[str] = {cuda!r}\n")
    return path


def test_plans_are_named_by_their_inputs(cpu_wheel_dir: Path) -> None:
    """Same settings give the same tag; variant, base and torch index each give another one."""
    plans = {images.plan_image("cpu").tag, images.plan_image("cuda").tag, images.plan_image("cuda", "public").tag,
             images.plan_image("cuda", torch_index="https://download.pytorch.org/whl/cu128").tag}
    assert len(plans) == 4
    assert images.plan_image("cuda").tag == images.plan_image("cuda").tag
    assert images.plan_image("cpu").tag.startswith("autoresearch-trainer:offline-")


def test_bad_variant_base_or_index_is_refused(cpu_wheel_dir: Path) -> None:
    """A misspelt variant, base or an index that is not an http(s) URL is a clear error."""
    with pytest.raises(ImageError, match="unknown image variant"):
        images.plan_image("rocm")  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="unknown image base"):
        images.plan_image("cuda", "alpine")  # type: ignore[arg-type]
    for bad in ("file:///etc", "https://x y", "pypi.org/simple", "https://a'b"):
        with pytest.raises(ImageError, match="not an http"):
            images.plan_image("cuda", torch_index=bad)


def test_cpu_variant_needs_the_local_torch_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the local CPU wheel the cpu plan says where to put it."""
    monkeypatch.setenv("AUTORESEARCH_WHEEL_DIR", str(tmp_path))
    with pytest.raises(ImageError, match="AUTORESEARCH_WHEEL_DIR"):
        images.plan_image("cpu")


@pytest.mark.parametrize(("driver", "variant", "note"), [
    (None, "cpu", "no NVIDIA driver"),
    ("580.65.06", "cuda", "from PyPI"),
    ("550.54.15", "cuda", "--torch-index https://download.pytorch.org/whl/cu128"),
    ("weird", "cuda", "not understood"),
])
def test_variant_follows_the_driver(driver: str | None, variant: str, note: str) -> None:
    """No driver: CPU image; a CUDA 13 capable driver: PyPI's CUDA torch; an older one: the cu12x index hint."""
    picked, message = images.pick_variant(driver)
    assert picked == variant and note in message


def test_cuda_download_ignores_the_hosts_pip_configuration(cpu_wheel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cuda variant's pip sees neither the host's find-links (a local CPU wheel) nor its config files."""
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")
    plan = images.plan_image("cuda", torch_index="https://download.pytorch.org/whl/cu128")
    env = images._pip_env(plan)
    assert "PIP_FIND_LINKS" not in env and env["PIP_CONFIG_FILE"] == "/dev/null"
    cmd = images._pip_download_cmd(plan, Path("/tmp/w"))
    assert cmd[cmd.index("--index-url") + 1] == "https://download.pytorch.org/whl/cu128"
    assert cmd[cmd.index("--extra-index-url") + 1] == images.PYPI_INDEX
    assert f"torch=={images.TORCH_VERSION}" in cmd and "manylinux_2_27_x86_64" in cmd
    assert images._pip_env(images.plan_image("cpu"))["PIP_FIND_LINKS"] == "/opt/wheels"


def test_cached_wheels_are_not_downloaded_again(cpu_wheel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete wheel folder for the same inputs is reused: no pip run, a line saying so."""
    plan = images.plan_image("cuda")
    folder = images.wheel_folder(plan)
    folder.mkdir(parents=True)
    (folder / ".complete").write_text("ok\n")

    def no_pip(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("pip ran although the wheels are cached")

    monkeypatch.setattr(images.subprocess, "Popen", no_pip)
    lines: list[str] = []
    assert images.download_wheels(plan, lines.append) == folder
    assert "nothing to download" in lines[-1]
    assert images.wheel_folder(images.plan_image("cuda", torch_index="https://download.pytorch.org/whl/cu128")) != folder


def test_torch_cuda_version_is_read_from_the_wheel(tmp_path: Path) -> None:
    """The CUDA label comes from torch/version.py inside the wheel; a CPU build says none."""
    _fake_torch_wheel(tmp_path, "13.0")
    assert images.torch_cuda_of(tmp_path) == "13.0"
    _fake_torch_wheel(tmp_path, None)
    assert images.torch_cuda_of(tmp_path) == "none"
    with pytest.raises(ImageError, match="no torch"):
        images.torch_cuda_of(tmp_path / "missing")


def test_one_dockerfile_for_both_bases_and_variants() -> None:
    """The recipe takes its base and versions as build arguments, labels them, and has a compiler step."""
    text = images.DOCKERFILE.read_text()
    assert [line for line in text.splitlines() if line.startswith("FROM ")] == [
        "FROM ${BASE_IMAGE} AS install", "FROM ${BASE_IMAGE}"]
    assert "pytorch/pytorch" not in text and '"torch==${TORCH_VERSION}"' in text and "--no-index" in text
    for label in ("torch", "torch_cuda", "variant", "base", "inputs"):
        assert f"{images.LABEL_PREFIX}{label}=" in text
    assert "g++" in text and "Python.h" in text and "autoresearch.pth" in text
    assert not (REPO_ROOT / "deploy" / "docker" / "offline.Dockerfile").exists()


def test_image_torch_matches_the_test_environment() -> None:
    """The images pin the torch version that the tests run with, inside pyproject's range."""
    import torch

    assert torch.__version__.split("+")[0] == images.TORCH_VERSION
    spec = re.search(r'"torch>=([0-9.]+),<([0-9.]+)"', (REPO_ROOT / "pyproject.toml").read_text())
    assert spec is not None
    as_tuple = tuple(int(part) for part in images.TORCH_VERSION.split("."))
    low = tuple(int(p) for p in spec.group(1).split("."))
    high = tuple(int(p) for p in spec.group(2).split("."))
    assert low <= as_tuple < high


def test_cuda_image_takes_driver_bindings_of_torchs_cuda_major() -> None:
    """The CUDA variant adds cuda-bindings of the CUDA major its torch index carries; the CPU variant does not."""
    from sandbox.images import EXTRA_REQUIREMENTS, PYPI_INDEX, requirements

    assert requirements("cpu") == EXTRA_REQUIREMENTS
    assert requirements("cuda", PYPI_INDEX)[-1] == "cuda-bindings>=13,<14"
    assert requirements("cuda", "https://download.pytorch.org/whl/cu128")[-1] == "cuda-bindings>=12,<13"
