"""The research loop: the session driver, the judge (keep rule), lanes, and what they share.

`session` runs a research session (lanes, stop, leases, pipelining); `judge` is the statistical keep rule;
`lanes` maps GPUs to lanes and gates launches.
"""

from __future__ import annotations

from daemon.research.session import MAX_INVALID_PROPOSALS, ResearchSession, SessionSummary, unified_diff

__all__ = ["MAX_INVALID_PROPOSALS", "ResearchSession", "SessionSummary", "unified_diff"]
