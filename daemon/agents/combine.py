"""Combines: a proposal built on the best plus an archived near-miss's change (`base: "combine:<id>"`).

The agent reads the near-misses in its ledger (discarded changes that came closest to a keep, ranked by
`daemon.research.archive`). It may name one of them as the base of its proposal: the candidate is then
the best's source with the agent's edits (none is fine: the combination alone), then the near-miss's
change re-applied on top. The new experiment records both parents (`parent_id` the best, `parent2_id`
the near-miss). An id the ledger does not list as a near-miss, a malformed base, or a near-miss whose
change no longer applies is an invalid proposal with a reason the agent can act on.

- `parse_base(raw)`: the near-miss id named by the tool input's `base`, or None for the best;
- `combine_diff(ctx, experiment_id)`: that near-miss's diff from the agent's context, checked;
- `candidate_source(best_source, edits, diff)`: the combined train.py;
- `reapply(diff, source)`: a unified diff's hunks re-applied as search/replace edits onto another source.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from daemon.agents.edits import apply_edits
from daemon.agents.types import Edit, ProposalContext
from daemon.errors import InvalidProposal

BEST = "best"
_COMBINE = re.compile(r"combine:#?(\d{1,12})")


def parse_base(raw: object) -> int | None:
    """The near-miss id of `base: "combine:<id>"`; None when base is absent or "best"."""
    base = raw.get("base") if isinstance(raw, dict) else None
    if base is None or base == BEST:
        return None
    if not isinstance(base, str):
        raise InvalidProposal('base must be the string "best" or "combine:<experiment id>"')
    match = _COMBINE.fullmatch(base.strip())
    if match is None:
        raise InvalidProposal(f'base must be "best" or "combine:<experiment id>" (e.g. "combine:12"), '
                              f"not {base.strip()[:40]!r}")
    return int(match.group(1))


def combinable_ids(ctx: ProposalContext) -> tuple[int, ...]:
    """The archived near-misses the agent may combine with: those its ledger lists."""
    return tuple(entry.id for entry in ctx.ledger.near_misses) if ctx.ledger is not None else ()


def combine_diff(ctx: ProposalContext, experiment_id: int) -> str:
    """The diff of near-miss `experiment_id` as the agent's context holds it; `InvalidProposal` if not listed."""
    if ctx.ledger is not None:
        for entry in ctx.ledger.near_misses:
            if entry.id == experiment_id:
                return entry.diff
    ids = combinable_ids(ctx)
    allowed = (f"the ids you may combine: {', '.join(str(i) for i in ids)}" if ids
               else 'there is none yet: use base "best"')
    raise InvalidProposal(f"#{experiment_id} is not an archived near-miss of this research line; {allowed}")


def candidate_source(best_source: str, edits: Sequence[Edit], diff: str | None) -> str:
    """The best with the agent's edits, then (when combining) the near-miss's change re-applied on top."""
    source = apply_edits(best_source, edits) if edits or diff is None else best_source
    if diff is None:
        return source
    try:
        return reapply(diff, source)
    except InvalidProposal as exc:
        raise InvalidProposal(f"the near-miss's change does not apply to the best with your edits: {exc}") from None


def reapply(diff: str, source: str) -> str:
    """Apply a unified diff's hunks to `source` as search/replace edits (each hunk's old text must occur once)."""
    edits = [edit for edit in _hunks(diff) if edit.search != edit.replace]
    if not edits:
        raise InvalidProposal("the diff has no change to re-apply")
    if any(not edit.search for edit in edits):
        raise InvalidProposal("a hunk without context or removed lines cannot be placed in another source")
    return apply_edits(source, edits)


def _hunks(diff: str) -> list[Edit]:
    edits: list[Edit] = []
    old: list[str] | None = None
    new: list[str] = []
    for line in diff.splitlines(keepends=True):
        if line.startswith("@@"):
            if old is not None:
                edits.append(Edit("".join(old), "".join(new)))
            old, new = [], []
        elif old is None:
            continue  # the ---/+++ header before the first hunk
        elif line.startswith(" "):
            old.append(line[1:])
            new.append(line[1:])
        elif line.startswith("-"):
            old.append(line[1:])
        elif line.startswith("+"):
            new.append(line[1:])
        elif line.startswith("\\"):
            continue  # "\ No newline at end of file"
        else:
            raise InvalidProposal(f"not a unified diff line: {line[:80]!r}")
    if old is not None:
        edits.append(Edit("".join(old), "".join(new)))
    return edits
