"""Exceptions raised by the daemon package.

`AutoresearchError` carries a message meant for a person: the CLI prints it on one line (plus the
`hint`, when there is one, saying what to do next) and exits non-zero, without a traceback.
"""

from __future__ import annotations


class AutoresearchError(Exception):
    """Base class: a failure the CLI reports as one clear line and a non-zero exit."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(AutoresearchError):
    """The configuration (TOML file, environment, secret file) is invalid."""

    exit_code = 2


class UsageError(AutoresearchError):
    """The command line asks for something the command does not do (exit code 2, like a config error)."""

    exit_code = 2


class DatabaseUnreachable(AutoresearchError):
    """The database server cannot be reached, or refuses the connection (exit code 5 in the CLI)."""

    exit_code = 5


class SchemaNotAtHead(AutoresearchError):
    """The database schema is not at this program's head revision (exit code 6 in the CLI)."""

    exit_code = 6


class NothingYet(AutoresearchError):
    """There is nothing to show yet: no session, no measured baseline (exit code 7 in the CLI)."""

    exit_code = 7


class WorkspaceError(AutoresearchError):
    """The workspace is missing, not initialised, or its program.md / train.py is unusable."""


class StoreError(AutoresearchError):
    """The database refused an operation."""


class TransitionError(StoreError):
    """An experiment was not in the state a transition expected; nothing was changed."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer version of this program."""


class AgentError(AutoresearchError):
    """The research agent could not produce a proposal."""


class AgentFatal(AgentError):
    """A non-retryable agent failure (bad credentials, bad request): stop the lane, do not loop."""


class CostCapReached(AgentError):
    """Tonight's spending reached the configured cap; no more proposals until the next window."""


class InvalidProposal(AgentError):
    """A proposal's edits do not apply or the result breaks a guard rule; the message is exact."""
