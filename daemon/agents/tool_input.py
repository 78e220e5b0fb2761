"""What every LLM agent shares, whatever its API: reading the tool call into a `Proposal` (the call itself and
its retries: daemon.agents.api_calls).

- `proposal_from_tool_input(raw, ctx)`: the tool call's input (a dict from JSON) -> a validated `Proposal`
  built on the best (with an archived near-miss re-applied for a `combine:<id>` base), or `InvalidProposal`
  naming what the model must fix;
- `parse_tool_input(raw)` / `parse_notes(raw)`: its fields;
- `refuse_repeat(ctx, source)`: `InvalidProposal` showing the tried idea a candidate repeats (the line's
  idea memory, daemon.agents.ideas), before any run is spent on it.
"""

from __future__ import annotations

from daemon.agents.combine import candidate_source, combine_diff, parse_base
from daemon.agents.edits import validate_candidate
from daemon.agents.fences import fence, new_nonce
from daemon.agents.ledger_text import idea_line
from daemon.agents.prompt import TOOL_NAME
from daemon.agents.types import Edit, Proposal, ProposalContext
from daemon.errors import InvalidProposal

MAX_DESCRIPTION_CHARS = 200
MAX_NOTES_CHARS = 4000


def proposal_from_tool_input(raw: object, ctx: ProposalContext) -> Proposal:
    """The proposal the tool input describes, applied to the best and validated (dedup included)."""
    description, hypothesis, edits = parse_tool_input(raw)
    combine_with = parse_base(raw)
    source = candidate_source(ctx.best_source, edits,
                              combine_diff(ctx, combine_with) if combine_with is not None else None)
    validate_candidate(source, ctx.seen_hashes)
    refuse_repeat(ctx, source)
    return Proposal(description=description, hypothesis=hypothesis, edits=edits, source=source,
                    notes=parse_notes(raw), combine_with=combine_with)


def refuse_repeat(ctx: ProposalContext, source: str) -> None:
    """Raise `InvalidProposal` when `source` repeats an idea of the line's memory, showing that idea (fenced)."""
    if ctx.ideas is None:
        return
    found = ctx.ideas.match(ctx.best_source, source)
    if found is not None:
        shown = fence(idea_line(found.idea, ctx.ideas.version) + "\n" + found.idea.change.text(),
                      ctx.fence_nonce or new_nonce(), 2000)
        raise InvalidProposal(f"this candidate repeats an idea already tried on this research line ({found.why}); "
                              f"it was not run. The tried idea:\n{shown}\nPropose a different change.")


def parse_tool_input(raw: object) -> tuple[str, str, tuple[Edit, ...]]:
    """(description, hypothesis, edits) from the tool call's input, or `InvalidProposal` naming the problem."""
    if not isinstance(raw, dict):
        raise InvalidProposal(f"the {TOOL_NAME} input must be an object with description, hypothesis and edits")
    description = raw.get("description")
    hypothesis = raw.get("hypothesis", "")
    if not isinstance(description, str) or not description.strip():
        raise InvalidProposal("description is missing: give one line saying what changed")
    description = description.strip()
    if "\n" in description or len(description) > MAX_DESCRIPTION_CHARS:
        raise InvalidProposal(f"description must be one line of at most {MAX_DESCRIPTION_CHARS} characters")
    if not isinstance(hypothesis, str):
        raise InvalidProposal("hypothesis must be a string")
    whole_file = raw.get("whole_file")
    raw_edits = raw.get("edits") or []
    if whole_file is None and not raw_edits and parse_base(raw) is not None:
        return description, hypothesis.strip(), ()  # a combination alone: the best plus the near-miss
    if whole_file is not None:
        if not isinstance(whole_file, str) or not whole_file.strip():
            raise InvalidProposal("whole_file must be the complete new train.py as a string")
        if raw_edits:
            raise InvalidProposal("give either edits or whole_file, not both")
        return description, hypothesis.strip(), (Edit(search="", replace=whole_file),)
    if not isinstance(raw_edits, list) or not raw_edits:
        raise InvalidProposal("edits must be a non-empty list of {search, replace} objects (or give whole_file)")
    edits = []
    for number, item in enumerate(raw_edits, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("search"), str) or not isinstance(item.get("replace"), str):
            raise InvalidProposal(f"edit {number} must be an object with string fields search and replace")
        if not item["search"]:
            raise InvalidProposal(f"edit {number} has an empty search text: quote the lines to change (or use whole_file)")
        edits.append(Edit(search=item["search"], replace=item["replace"]))
    return description, hypothesis.strip(), tuple(edits)


def parse_notes(raw: object) -> str:
    """The notebook entry the model wrote with its proposal ("" when none); never a reason to refuse it."""
    notes = raw.get("notebook") if isinstance(raw, dict) else None
    return notes.strip()[:MAX_NOTES_CHARS] if isinstance(notes, str) else ""


