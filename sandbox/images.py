"""Trainer images: ONE recipe (deploy/docker/trainer.Dockerfile) for CPU and CUDA, with or without a registry.

The recipe takes a base image and a folder of wheels downloaded on the host, so the build itself needs
no network:
- base `debootstrap` (no registry): a Debian bookworm minbase root filesystem with python3, gcc/g++ and the
  Python headers (Triton and Inductor compile C/C++ at run time), made once with debootstrap and
  `docker import`ed;
- base `public` (servers with a registry): `python:3.11-slim-bookworm`; the recipe adds gcc/g++ with apt.
Variants: `cpu` takes torch's CPU wheel from the local wheel folder (this project's machines) and `cuda`
takes PyPI's torch (its Linux build is the CUDA one and carries the CUDA runtime as nvidia-* wheels; the
host only gives the driver). `torch_index` points at another index for older drivers, e.g.
https://download.pytorch.org/whl/cu128. The same torch version (TORCH_VERSION) everywhere.

Images are tagged by a hash of everything that goes into them and carry labels (torch version, CUDA
version, variant, base, inputs) that `autoresearch doctor` prints. Wheels are cached on the host per input
set, so a rebuild downloads nothing; a file lock makes concurrent callers build once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sandbox.docker_backend import image_exists
from sandbox.errors import ImageError

Progress = Callable[[str], None]
Variant = Literal["cpu", "cuda"]
Base = Literal["debootstrap", "public"]

TRAINER_REPO = "autoresearch-trainer"
OFFLINE_REPO = TRAINER_REPO  # the CPU image of tests and CI
OFFLINE_TAG = f"{TRAINER_REPO}:offline"
CUDA_TAG = f"{TRAINER_REPO}:cuda"
BASE_REPO = "autoresearch-base"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# python3-dev and gcc/g++: Triton builds a small C module against Python.h, Inductor compiles C++ kernels on CPU.
DEBIAN_PACKAGES = ("python3", "python3-pip", "python3-dev", "gcc", "g++", "libc6-dev", "ca-certificates")
PUBLIC_BASE = "python:3.11-slim-bookworm"
TORCH_VERSION = "2.13.0"
PYPI_INDEX = "https://pypi.org/simple"
# Besides torch: numpy (memmapped tokens), tiktoken (the tokenizer), tokenizers (BPE training on the host side).
EXTRA_REQUIREMENTS = ("numpy", "tiktoken", "tokenizers")
# The CUDA variant also takes the CUDA driver's Python bindings (the eval's device transport, trainer.transport),
# of the CUDA major that torch's wheels carry: 12 from a cu12x index, 13 from PyPI's default build.


def requirements(variant: str, torch_index: str = PYPI_INDEX) -> tuple[str, ...]:
    """What the image installs besides torch."""
    if variant != "cuda":
        return EXTRA_REQUIREMENTS
    major = "12" if "/cu12" in torch_index else "13"
    return (*EXTRA_REQUIREMENTS, f"cuda-bindings>={major},<{int(major) + 1}")
PYTHON_VERSION = "3.11"
# Wheels for Debian bookworm (glibc 2.36) on x86_64: pip takes only the exact tags it is given.
PLATFORMS = (*(f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)), "manylinux2014_x86_64",
             "linux_x86_64")
LABEL_PREFIX = "org.autoresearch."
# NVIDIA's minimum driver for each CUDA major version of torch's wheels (Linux).
MIN_DRIVER = {"13": 580, "12": 525}
REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "trainer.Dockerfile"


@dataclass(frozen=True)
class ImagePlan:
    """What one build takes: variant, base, torch index; `tag` names it by the hash of its inputs."""

    variant: Variant
    base: Base
    torch_index: str
    inputs: str
    tag: str


def cache_dir() -> Path:
    """Where the rootfs tarball and downloaded wheels are kept between builds."""
    root = os.environ.get("AUTORESEARCH_CACHE") or str(Path.home() / ".cache" / "autoresearch")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheel_dir() -> Path:
    """The host's local wheel folder holding the torch CPU wheel (the `cpu` variant)."""
    return Path(os.environ.get("AUTORESEARCH_WHEEL_DIR", "/opt/wheels"))


def _torch_cpu_wheel() -> Path:
    found = sorted(wheel_dir().glob(f"torch-{TORCH_VERSION}*-cp311-*.whl"))
    if not found:
        raise ImageError(f"no torch {TORCH_VERSION} cp311 wheel in {wheel_dir()}: put it there, set "
                         "AUTORESEARCH_WHEEL_DIR to the folder that holds it, or build the cuda variant")
    return found[-1]


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def validate_index(url: str) -> str:
    """The torch index URL, or ImageError: only http(s) URLs without spaces or quotes."""
    if not re.fullmatch(r"https?://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+", url) or "'" in url:
        raise ImageError(f"torch index {url!r} is not an http(s) URL: use e.g. {PYPI_INDEX} or "
                         "https://download.pytorch.org/whl/cu128")
    return url.rstrip("/")


def plan_image(variant: Variant = "cpu", base: Base = "debootstrap", torch_index: str = PYPI_INDEX) -> ImagePlan:
    """The build plan and hashed tag for these settings (no Docker, no network)."""
    if variant not in ("cpu", "cuda"):
        raise ImageError(f"unknown image variant {variant!r}: use cpu or cuda")
    if base not in ("debootstrap", "public"):
        raise ImageError(f"unknown image base {base!r}: use debootstrap (no registry) or public")
    index = validate_index(torch_index)
    torch_source = _torch_cpu_wheel().name if variant == "cpu" else index
    base_inputs = (DEBIAN_SUITE, DEBIAN_MIRROR, *DEBIAN_PACKAGES) if base == "debootstrap" else (PUBLIC_BASE,)
    inputs = _digest(variant, base, *base_inputs, TORCH_VERSION, torch_source, *requirements(variant, index),
                     *PLATFORMS, DOCKERFILE.read_text())
    name = "offline" if variant == "cpu" else "cuda"
    suffix = "" if base == "debootstrap" else "-public"
    return ImagePlan(variant, base, index, inputs, f"{TRAINER_REPO}:{name}{suffix}-{inputs}")


def pick_variant(driver_version: str | None) -> tuple[Variant, str]:
    """The variant for a host with this NVIDIA driver (None: no driver) and a note for the user."""
    if not driver_version:
        return "cpu", "no NVIDIA driver found: building the CPU image"
    try:
        major = int(driver_version.split(".")[0])
    except ValueError:
        return "cuda", f"driver {driver_version!r} not understood: building the CUDA image from PyPI"
    if major < MIN_DRIVER["13"]:
        return "cuda", (f"driver {driver_version} is older than {MIN_DRIVER['13']}, which PyPI's CUDA 13 torch needs: "
                        "pass --torch-index https://download.pytorch.org/whl/cu128 (or upgrade the driver)")
    return "cuda", f"driver {driver_version}: building the CUDA image (torch {TORCH_VERSION} from PyPI)"


CU12_INDEX = "https://download.pytorch.org/whl/cu128"  # CUDA 12 torch: drivers >= 525 (minor-version compatibility)


def fitting_torch_index(driver_version: str) -> str | None:
    """The torch index whose CUDA runs on this driver (None: too old for any CUDA build of TORCH_VERSION)."""
    try:
        major = int(driver_version.split(".")[0])
    except ValueError:
        return None
    if major >= MIN_DRIVER["13"]:
        return PYPI_INDEX
    return CU12_INDEX if major >= MIN_DRIVER["12"] else None


def driver_refusal(driver_version: str | None, variant: Variant, torch_index: str) -> str | None:
    """Why a CUDA image from this index would see no CUDA under this host's driver (None: it fits, or the driver
    is unknown). Such an image never trains on the GPU: every GPU run would end infra_error."""
    if variant != "cuda" or not driver_version or validate_index(torch_index) != PYPI_INDEX:
        return None
    fitting = fitting_torch_index(driver_version)
    if fitting == PYPI_INDEX or (fitting is None and not driver_version.split(".")[0].isdigit()):
        return None
    fix = f"build with --torch-index {fitting}" if fitting else f"upgrade the driver (>= {MIN_DRIVER['12']})"
    return (f"driver {driver_version} is older than {MIN_DRIVER['13']}, which PyPI's CUDA 13 torch {TORCH_VERSION} "
            f"needs: its containers would see no CUDA device; {fix} or upgrade the driver to >= {MIN_DRIVER['13']} "
            "(--force builds this image anyway)")


def host_driver_version() -> str | None:
    """The NVIDIA driver version of this host, or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def _run(cmd: list[str], progress: Progress, what: str, **kwargs: Any) -> None:
    progress(f"[image] {what}")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise ImageError(f"{what} failed (exit {proc.returncode}): {tail}")


@contextmanager
def _build_lock(name: str) -> Iterator[None]:
    lock_path = cache_dir() / f"{name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _docker_client() -> Any:
    import docker

    try:
        client = docker.from_env(timeout=1800)
        client.ping()
    except Exception as exc:
        raise ImageError(f"no Docker engine answers ({exc}); start dockerd (`make services`)") from None
    return client


def _debootstrap_base(client: Any, progress: Progress) -> str:
    """Debian minbase + python3 + compilers, imported from a cached rootfs tarball (debootstrap runs once)."""
    key = _digest(DEBIAN_SUITE, DEBIAN_MIRROR, *DEBIAN_PACKAGES)
    tag = f"{BASE_REPO}:{DEBIAN_SUITE}-{key}"
    if image_exists(client, tag):
        return tag
    tarball = cache_dir() / f"rootfs-{DEBIAN_SUITE}-{key}.tar"
    if not tarball.exists():
        if shutil.which("debootstrap") is None:
            raise ImageError("debootstrap is not installed; run `apt-get install -y debootstrap`")
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            rootfs = Path(tmp) / "rootfs"
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
                  DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR],
                 progress, f"debootstrap {DEBIAN_SUITE} minbase + python3 + gcc/g++ (a minute or two)")
            # Drop apt lists and caches: they are large and useless in an image that never runs apt.
            for junk in ("var/lib/apt/lists", "var/cache/apt/archives"):
                shutil.rmtree(rootfs / junk, ignore_errors=True)
            partial = tarball.with_suffix(".partial")
            _run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], progress, "packing the root filesystem")
            partial.rename(tarball)
    _run(["docker", "import", str(tarball), tag], progress,
         f"docker import -> {tag} ({tarball.stat().st_size / 1e6:.0f} MB)")
    return tag


def _pip_env(plan: ImagePlan) -> dict[str, str]:
    """pip's environment: for the cuda variant the host's pip configuration (find-links to a local CPU
    wheel, constraints, mirrors) is ignored, so that exactly the configured index decides which torch."""
    env = dict(os.environ)
    if plan.variant == "cuda":
        env.pop("PIP_FIND_LINKS", None)
        env.pop("PIP_CONSTRAINT", None)
        env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _pip_download_cmd(plan: ImagePlan, target: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--progress-bar", "off",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(target), "--find-links", str(target)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    if plan.variant == "cuda":
        cmd += ["--index-url", plan.torch_index]
        if plan.torch_index != PYPI_INDEX:
            cmd += ["--extra-index-url", PYPI_INDEX]
    return [*cmd, f"torch=={TORCH_VERSION}", *requirements(plan.variant, plan.torch_index)]


def wheel_folder(plan: ImagePlan) -> Path:
    """The host cache folder of the plan's wheels (one per torch source and requirement set)."""
    key = _digest(plan.variant, plan.torch_index if plan.variant == "cuda" else _torch_cpu_wheel().name,
                  TORCH_VERSION, *requirements(plan.variant, plan.torch_index), *PLATFORMS)
    return cache_dir() / "wheels" / f"{plan.variant}-{key}"


def download_wheels(plan: ImagePlan, progress: Progress = print) -> Path:
    """Every wheel the image installs, in a host cache folder per input set (a second call downloads nothing)."""
    target = wheel_folder(plan)
    if (target / ".complete").exists():
        progress(f"[image] wheels cached in {target} ({_folder_mb(target):,.0f} MB): nothing to download")
        return target
    target.mkdir(parents=True, exist_ok=True)
    if plan.variant == "cpu":
        wheel = _torch_cpu_wheel()
        if not (target / wheel.name).exists():
            shutil.copy2(wheel, target / wheel.name)
    progress(f"[image] pip download torch=={TORCH_VERSION} ({plan.variant}) and "
             f"{', '.join(requirements(plan.variant, plan.torch_index))} "
             f"into {target}" + (f" from {plan.torch_index}" if plan.variant == "cuda" else ""))
    started = time.monotonic()
    proc = subprocess.Popen(_pip_download_cmd(plan, target), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_pip_env(plan))
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.strip()
        tail = [*tail[-30:], line]
        if line.startswith(("Saved ", "File was already downloaded")):
            name = line.split()[-1]
            path = target / Path(name).name
            size = path.stat().st_size / 1e6 if path.exists() else 0.0
            progress(f"[image]   {'cached' if line.startswith('File') else 'got'} {path.name} ({size:,.1f} MB)")
    if proc.wait() != 0:
        raise ImageError(f"pip download of the image's wheels failed (exit {proc.returncode}): " + " | ".join(tail[-6:])
                         + " -- check the network and --torch-index")
    (target / ".complete").write_text("ok\n")
    progress(f"[image] wheels: {_folder_mb(target):,.0f} MB in {time.monotonic() - started:.0f} s")
    return target


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def torch_cuda_of(wheels: Path) -> str:
    """The CUDA version torch's wheel was built for ('none' for a CPU build), read from its torch/version.py."""
    found = sorted(wheels.glob(f"torch-{TORCH_VERSION}*.whl"))
    if not found:
        raise ImageError(f"no torch {TORCH_VERSION} wheel in {wheels}: delete the folder and build again")
    with zipfile.ZipFile(found[-1]) as wheel:
        text = wheel.read("torch/version.py").decode()
    match = re.search(r"^cuda(?:\s*:\s*[^=]+)?\s*=\s*['\"]([0-9.]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else "none"


def _build(client: Any, context: Path, tag: str, buildargs: dict[str, str], progress: Progress) -> None:
    progress(f"[image] docker build -> {tag}")
    started = time.monotonic()
    try:
        stream = client.api.build(path=str(context), dockerfile="Dockerfile", tag=tag, rm=True,
                                  forcerm=True, buildargs=buildargs, decode=True)
        for chunk in stream:
            if "error" in chunk:
                raise ImageError(f"docker build of {tag} failed: {chunk['error'].strip()}")
            line = str(chunk.get("stream", "")).strip()
            if line.startswith("Step "):
                progress(f"[image]   {line} ({time.monotonic() - started:.0f} s)")
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"docker build of {tag} failed: {exc}") from None


def image_labels(client: Any, tag: str) -> dict[str, str]:
    """The org.autoresearch.* labels of an image (empty for an image built some other way)."""
    labels = client.images.get(tag).labels or {}
    return {k[len(LABEL_PREFIX):]: str(v) for k, v in labels.items() if k.startswith(LABEL_PREFIX)}


def ensure_image(plan: ImagePlan, tag: str | None = None, progress: Progress = print) -> str:
    """Build (or find cached) the image of `plan`; tag it `tag` too; return its hashed tag."""
    client = _docker_client()
    try:
        with _build_lock(f"image-{plan.variant}"):
            if not image_exists(client, plan.tag):
                started = time.monotonic()
                progress(f"[image] building {plan.tag} ({plan.variant}, base {plan.base}); cached afterwards")
                base = _debootstrap_base(client, progress) if plan.base == "debootstrap" else PUBLIC_BASE
                wheels = download_wheels(plan, progress)
                with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
                    context = Path(tmp)
                    shutil.copy2(DOCKERFILE, context / "Dockerfile")
                    # A hard-link copy keeps the context cheap; the wheels never change once complete.
                    shutil.copytree(wheels, context / "wheels", copy_function=os.link,
                                    ignore=shutil.ignore_patterns(".complete"))
                    _build(client, context, plan.tag, {
                        "BASE_IMAGE": base, "TORCH_VERSION": TORCH_VERSION, "TORCH_CUDA": torch_cuda_of(wheels),
                        "VARIANT": plan.variant, "IMAGE_BASE": plan.base, "INPUTS": plan.inputs,
                        "EXTRAS": " ".join(requirements(plan.variant, plan.torch_index))}, progress)
                size = client.images.get(plan.tag).attrs.get("Size", 0) / 1e9
                progress(f"[image] built {plan.tag}: {size:.2f} GB in {time.monotonic() - started:.0f} s")
            image = client.images.get(plan.tag)
            default = OFFLINE_TAG if plan.variant == "cpu" else CUDA_TAG
            for extra in {default, tag or default}:
                repo, _, version = extra.rpartition(":")
                image.tag(repo, version)
    finally:
        client.close()
    return plan.tag


def ensure_offline_image(tag: str | None = None, progress: Progress = print) -> str:
    """The CPU trainer image built without any registry (tests, CI); return its hashed tag."""
    return ensure_image(plan_image("cpu", "debootstrap"), tag, progress)


def offline_image_inputs() -> str:
    """The hash that names the offline CPU image."""
    return plan_image("cpu", "debootstrap").inputs


def build_production_image(tag: str, progress: Progress = print, *, variant: Variant | Literal["auto"] = "auto",
                           base: Base = "debootstrap", torch_index: str = PYPI_INDEX, force: bool = False) -> str:
    """The trainer image for this host: variant picked from its NVIDIA driver unless given; tagged `tag`.
    Refuses (ImageError) a CUDA image this host's driver cannot run, unless `force` (e.g. built for another host)."""
    driver = host_driver_version()
    if variant == "auto":
        variant, note = pick_variant(driver)
        progress(f"[image] {note}")
    if (refusal := driver_refusal(driver, variant, torch_index)) is not None:
        if not force:
            raise ImageError(refusal)
        progress(f"[image] --force: {refusal}")
    return ensure_image(plan_image(variant, base, torch_index), tag, progress)
