"""The Slurm backend: each stage of an experiment is one Slurm job running the hardened container on a node.

Modules: `backend` (submit, wait, cancel, collect), `script` (the batch script: the docker backend's
container rendered as `docker run`), `states` (job states and the status file -> `RunStatus`), `commands`
(the Slurm clients), `reaper` (start-up reconciliation of jobs a dead daemon left).
"""

from __future__ import annotations

from sandbox.slurm.backend import SlurmBackend, SlurmOptions

__all__ = ["SlurmBackend", "SlurmOptions"]
