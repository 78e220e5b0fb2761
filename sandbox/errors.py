"""Exceptions raised by the sandbox package.

The tree is small on purpose: callers distinguish "the sandbox itself is broken" (infrastructure,
retry later or on another backend) from "the spec asked for something impossible" (a bug on our side).
A candidate that crashes, hangs or misbehaves is never an exception: it is a `RunResult` status.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of every sandbox error."""


class BackendUnavailable(SandboxError):
    """The backend cannot run anything here (no Docker engine answering, no image, no unshare...)."""


class ImageError(SandboxError):
    """A trainer image could not be built or is missing."""


class InvalidSpec(SandboxError):
    """A RunSpec is inconsistent (mount of a missing path, writable data mount, two GPUs...)."""
