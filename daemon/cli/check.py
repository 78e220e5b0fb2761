"""One line of `autoresearch doctor`: a named check, its verdict and how to fix it (shared by every doctor module)."""

from __future__ import annotations

from dataclasses import dataclass

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    verdict: str  # OK | WARN | FAIL
    detail: str
    fix: str = ""
