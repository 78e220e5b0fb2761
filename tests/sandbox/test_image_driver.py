"""`image build` refuses a CUDA 13 image on a driver too old for it (no silent CPU night), naming the index that fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import images
from sandbox.errors import ImageError


@pytest.mark.parametrize(("driver", "variant", "index", "refused", "names"), [
    ("550.54.15", "cuda", images.PYPI_INDEX, True, f"--torch-index {images.CU12_INDEX}"),
    ("470.82.01", "cuda", images.PYPI_INDEX, True, "upgrade the driver (>= 525)"),
    ("580.65.06", "cuda", images.PYPI_INDEX, False, ""),
    ("550.54.15", "cuda", images.CU12_INDEX, False, ""),
    ("550.54.15", "cpu", images.PYPI_INDEX, False, ""),
    (None, "cuda", images.PYPI_INDEX, False, ""),
    ("weird", "cuda", images.PYPI_INDEX, False, ""),
])
def test_driver_refusal(driver: str | None, variant: images.Variant, index: str, refused: bool, names: str) -> None:
    """Only a CUDA 13 image on a known driver < 580 is refused; the reason names the fix and --force."""
    why = images.driver_refusal(driver, variant, index)
    assert (why is not None) == refused
    if refused:
        assert why is not None and names in why and "--force" in why


@pytest.fixture()
def old_driver_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """FAKE at the edge: an `nvidia-smi` that reports driver 550, and a recorder instead of the Docker build."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 550.54.15\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:/usr/bin:/bin")
    built: list[object] = []
    monkeypatch.setattr(images, "ensure_image",
                        lambda plan, tag=None, progress=print: built.append((plan.variant, plan.torch_index)) or "t")
    return built


def test_image_build_refuses_cuda13_on_an_old_driver(old_driver_host: list[object]) -> None:
    """auto and cuda variants on driver 550 from PyPI: refused before anything is built."""
    for variant in ("auto", "cuda"):
        with pytest.raises(ImageError, match="cu128"):
            images.build_production_image("t", progress=lambda _: None, variant=variant)  # type: ignore[arg-type]
    assert old_driver_host == []


def test_force_or_the_fitting_index_builds(old_driver_host: list[object]) -> None:
    """--force builds it anyway (saying why); the index the refusal names builds without --force."""
    notes: list[str] = []
    images.build_production_image("t", progress=notes.append, variant="cuda", force=True)
    images.build_production_image("t", progress=notes.append, variant="cuda", torch_index=images.CU12_INDEX)
    assert old_driver_host == [("cuda", images.PYPI_INDEX), ("cuda", images.CU12_INDEX)]
    assert any("--force" in note for note in notes)
