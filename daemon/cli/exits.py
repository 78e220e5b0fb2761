"""The `autoresearch` command's exit codes: one meaning each, the same for every command.

Scripts and systemd read these: `status` tells "not running" (3) from "unhealthy" (4) from "database
unreachable" (5); a configuration or usage error is 2 for every command (the unit's
`RestartPreventExitStatus=2` keeps systemd from restarting into it).
"""

from __future__ import annotations

OK = 0                 # done; `status`: the daemon answers and is healthy
FAILED = 1             # the command ran and failed (a run crashed, a build failed, a session stopped)
USAGE = 2              # bad arguments, bad configuration (file, environment variable, secret file)
NOT_RUNNING = 3        # `status`: no daemon answers at the address (or what answers is not the daemon)
UNHEALTHY = 4          # `status`: the daemon answers but is unhealthy (stale loop, database lost)
DB_UNREACHABLE = 5     # the database cannot be reached or refuses the connection
SCHEMA_NOT_AT_HEAD = 6 # the database schema is behind (or ahead of) this program's migrations
NOTHING_YET = 7        # nothing to show yet (no session, no measured baseline)
LOCKED = 8             # another daemon holds this database's lock (`run`, `once`, `try`, `db upgrade`)
INTERNAL = 70          # a bug: an unexpected exception (no traceback unless AUTORESEARCH_DEBUG=1)
INTERRUPTED = 130      # Ctrl-C

TABLE: tuple[tuple[int, str], ...] = (
    (OK, "ok (status: the daemon is running and healthy)"),
    (FAILED, "the command failed"),
    (USAGE, "usage or configuration error"),
    (NOT_RUNNING, "status: no daemon answers"),
    (UNHEALTHY, "status: the daemon answers but is unhealthy"),
    (DB_UNREACHABLE, "database unreachable"),
    (SCHEMA_NOT_AT_HEAD, "database schema not at this version's head (db current, db upgrade needed)"),
    (NOTHING_YET, "nothing to show yet (no session or no measured baseline)"),
    (LOCKED, "another daemon holds the database lock"),
    (INTERNAL, "internal error (a bug; AUTORESEARCH_DEBUG=1 prints the traceback)"),
    (INTERRUPTED, "interrupted"),
)
CODES = frozenset(code for code, _ in TABLE)


def epilog() -> str:
    """The table as `--help` shows it."""
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {meaning}" for code, meaning in TABLE)
