"""The CLI's command handlers: each takes the parsed args and settings and returns an exit code."""

from __future__ import annotations

import argparse

from daemon import doctor
from daemon.config import Settings


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    checks = doctor.run_checks(settings)
    print(doctor.render(checks))
    return 1 if any(c.verdict == doctor.FAIL for c in checks) else 0
