"""Names and metadata of prepared data that need no torch: the train stage's harness imports only this,
so it starts in milliseconds instead of paying for a torch import it never uses."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHECKPOINT_NAME = "model.pt2"
# The kernel-sized folder (a tmpfs of the sandbox) a split train stage's candidate writes instead of the out dir.
WORK_ENV = "AUTORESEARCH_WORK_DIR"
# Lines the baseline prints for its log. Informational only: the harness's clock (trainer.clock) ignores them.
TRAINING_STARTS = "autoresearch: training starts"
EXPORT_STARTS = "autoresearch: export starts"


def announce_training_start() -> None:
    """Say in the log that warm-up/compilation is over (informational: the stage's clock started at the spawn)."""
    print(TRAINING_STARTS, flush=True)


def announce_export_start() -> None:
    """Say in the log that training is over (export_checkpoint calls this; informational)."""
    print(EXPORT_STARTS, flush=True)


class DataError(Exception):
    """Prepared data or a data source is unusable; the message says what to do next."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (token files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise DataError(f"{path} is missing: run `autoresearch prepare` to (re)build the data") from None
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}): run `autoresearch prepare` again") from None


def read_split_meta(split_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(split_dir) / "meta.json")
