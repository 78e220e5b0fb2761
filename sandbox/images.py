"""Trainer images: the offline CPU image (debootstrap + local torch wheel) and the production CUDA image.

The offline image needs no container registry: a Debian root filesystem made with debootstrap is
`docker import`ed as the base, and torch/numpy/tiktoken are installed from wheels downloaded on the
host. It is tagged by a hash of everything that goes into it, so it is rebuilt only when an input
changes; a file lock makes concurrent callers (parallel test sessions) build it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sandbox.docker_backend import image_exists
from sandbox.errors import ImageError

Progress = Callable[[str], None]

OFFLINE_REPO = "autoresearch-trainer"
OFFLINE_TAG = f"{OFFLINE_REPO}:offline"
BASE_REPO = "autoresearch-base"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ("python3", "python3-pip", "ca-certificates")
TORCH_VERSION = "2.13.0"
# What the image needs besides torch: numpy for the memmapped token files, tiktoken for the tokenizer.
EXTRA_REQUIREMENTS = ("numpy", "tiktoken")
REPO_ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "trainer.Dockerfile"
OFFLINE_DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "offline.Dockerfile"


def cache_dir() -> Path:
    """Where the rootfs tarball and downloaded wheels are kept between builds."""
    root = os.environ.get("AUTORESEARCH_CACHE") or str(Path.home() / ".cache" / "autoresearch")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheel_dir() -> Path:
    """The host's local wheel cache holding the torch CPU wheel."""
    return Path(os.environ.get("AUTORESEARCH_WHEEL_DIR", "/opt/wheels"))


def _torch_wheel() -> Path:
    found = sorted(wheel_dir().glob(f"torch-{TORCH_VERSION}*-cp311-*.whl"))
    if not found:
        raise ImageError(f"no torch {TORCH_VERSION} cp311 wheel in {wheel_dir()}: put it there or set "
                         "AUTORESEARCH_WHEEL_DIR to the folder that holds it")
    return found[-1]


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


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
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as exc:
        raise ImageError(f"no Docker engine answers ({exc}); start dockerd (`make services`)") from None
    return client


def _base_image(client: Any, progress: Progress) -> str:
    """Debian minbase + python3, imported from a cached rootfs tarball (debootstrap runs once)."""
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
            _run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
                 DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR],
                progress, f"debootstrap {DEBIAN_SUITE} minbase (about a minute)",
            )
            # Drop apt lists and caches: they are large and useless in an image that never runs apt.
            for junk in ("var/lib/apt/lists", "var/cache/apt/archives"):
                shutil.rmtree(rootfs / junk, ignore_errors=True)
            partial = tarball.with_suffix(".partial")
            _run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], progress, "packing the root filesystem")
            partial.rename(tarball)
    _run(["docker", "import", str(tarball), tag], progress, f"docker import -> {tag}")
    return tag


def _download_wheels(progress: Progress) -> Path:
    """torch from the local wheel cache plus everything it and the extras need, as binary wheels only."""
    torch_wheel = _torch_wheel()
    key = _digest(torch_wheel.name, *EXTRA_REQUIREMENTS)
    target = cache_dir() / f"wheels-{key}"
    if (target / ".complete").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(torch_wheel, target / torch_wheel.name)
    _run(
        [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--quiet",
         "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--implementation", "cp",
         "-d", str(target), "--find-links", str(target), f"torch=={TORCH_VERSION}", *EXTRA_REQUIREMENTS],
        progress, "pip download of the image's wheels (torch from the local cache)",
    )
    (target / ".complete").write_text("ok\n")
    return target


def _build(client: Any, context: Path, dockerfile: str, tag: str, buildargs: dict[str, str],
           progress: Progress) -> None:
    progress(f"[image] docker build -> {tag}")
    try:
        stream = client.api.build(path=str(context), dockerfile=dockerfile, tag=tag, rm=True,
                                  forcerm=True, buildargs=buildargs, decode=True)
        for chunk in stream:
            if "error" in chunk:
                raise ImageError(f"docker build of {tag} failed: {chunk['error'].strip()}")
            line = str(chunk.get("stream", "")).strip()
            if line.startswith("Step "):
                progress(f"[image]   {line}")
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"docker build of {tag} failed: {exc}") from None


def offline_image_inputs() -> str:
    """The hash that names the offline image: base, wheels and the Dockerfile text."""
    return _digest(DEBIAN_SUITE, DEBIAN_MIRROR, *DEBIAN_PACKAGES, _torch_wheel().name, *EXTRA_REQUIREMENTS,
                   OFFLINE_DOCKERFILE.read_text())


def ensure_offline_image(tag: str | None = None, progress: Progress = print) -> str:
    """Build (or find cached) the CPU trainer image without any registry; return its hashed tag."""
    hashed = f"{OFFLINE_REPO}:offline-{offline_image_inputs()}"
    client = _docker_client()
    try:
        with _build_lock("offline-image"):
            if not image_exists(client, hashed):
                progress(f"[image] building {hashed} (first time: a few minutes; cached afterwards)")
                base = _base_image(client, progress)
                wheels = _download_wheels(progress)
                with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
                    context = Path(tmp)
                    shutil.copy2(OFFLINE_DOCKERFILE, context / "Dockerfile")
                    # A hard-link copy keeps the context cheap; the wheels never change once complete.
                    shutil.copytree(wheels, context / "wheels", copy_function=os.link)
                    _build(client, context, "Dockerfile", hashed, {"BASE_IMAGE": base}, progress)
            image = client.images.get(hashed)
            for extra in {OFFLINE_TAG, tag or OFFLINE_TAG}:
                repo, _, version = extra.rpartition(":")
                image.tag(repo, version)
    finally:
        client.close()
    return hashed


def build_production_image(tag: str, progress: Progress = print) -> str:
    """Build deploy/docker/trainer.Dockerfile (CUDA PyTorch base, trainer baked in) as `tag`."""
    client = _docker_client()
    try:
        # A small context (Dockerfile + trainer/) instead of the repository, which holds a virtualenv.
        with tempfile.TemporaryDirectory() as tmp:
            context = Path(tmp)
            shutil.copy2(PRODUCTION_DOCKERFILE, context / "Dockerfile")
            shutil.copytree(REPO_ROOT / "trainer", context / "trainer",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            _build(client, context, "Dockerfile", tag, {}, progress)
    finally:
        client.close()
    return tag
