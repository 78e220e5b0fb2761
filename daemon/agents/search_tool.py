"""The `search_ideas` tool: the LLM agents look up what the research line already tried before they propose.

Both LLM agents offer it beside `propose_experiment` (in that fixed order: the tool list is the start of the
cached prompt) while `agent.idea_searches` > 0, and answer each call with a tool result from
`IdeaSearches.answer`:
- the input is `{"query": words, a constant name or a code fragment, "outcome": optional filter}`; a bad
  input is answered with an error naming the fix;
- the answer lists the best `MAX_HITS` matches (daemon.agents.idea_search): per idea its id (its first
  experiment), the experiments that tried it, outcome, effect ± standard error, runs and measurement version
  (our numbers, outside the fence), then its description and normalized change lines, which candidates and
  past proposals wrote: inside the line's data fence (daemon.agents.fences), cut to `MAX_HIT_LINES` lines of
  `MAX_LINE_CHARS`, the whole answer to about `MAX_ANSWER_CHARS`;
- at most `limit` searches per proposal: a call past it is answered with an error saying to propose now
  (`ToolAnswer.refused`), and the agent counts that reply as a failed round, so that a proposal still ends
  after at most `idea_searches + repair_rounds + 1` replies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemon.agents.fences import fence
from daemon.agents.idea_search import OUTCOME_GROUPS, Hit, search_ideas
from daemon.agents.ideas import IdeaMemory
from daemon.agents.prompt import SEARCH_TOOL, TOOL_NAME
from daemon.ops.logs import get_logger

log = get_logger("autoresearch.agent")

MAX_HITS = 6
MAX_QUERY_CHARS = 2000
MAX_HIT_LINES = 16
MAX_LINE_CHARS = 160
MAX_DESCRIPTION_CHARS = 200
MAX_ANSWER_CHARS = 9000


def search_tool_definition() -> dict[str, Any]:
    return {
        "name": SEARCH_TOOL,
        "description": "Search every idea this research line has tried (all nights): the matching ideas with their "
                       "outcome, effect ± standard error, measurement version and normalized change, best match "
                       "first. Use it before proposing, then call propose_experiment.",
        "input_schema": {
            "type": "object",
            "properties": {
                "query": {"type": "string",
                          "description": "words, a constant name (MATRIX_LR) or a code fragment; formatting and "
                                         "constant names are normalized as in the idea memory; empty: the newest"},
                "outcome": {"type": "string", "enum": ["any", *OUTCOME_GROUPS],
                            "description": "only ideas with this outcome (refused: discarded or did not hold; "
                                           "failed: crashed, timeout, oom or invalid)"},
            },
            "required": ["query"],
        },
    }


@dataclass(frozen=True)
class ToolAnswer:
    """The content of one tool result, whether it is an error, and whether it refused a search over the bound."""

    text: str
    is_error: bool = False
    refused: bool = False


def is_search_reply(names: Sequence[str]) -> bool:
    """A reply that calls search_ideas and nothing else: answered, the model goes on."""
    return bool(names) and all(name == SEARCH_TOOL for name in names)


def answer_call(name: str, raw: object, searches: IdeaSearches, problem: str) -> ToolAnswer:
    """The answer to one tool call of a reply that did not give a usable proposal (`problem` says why)."""
    if name == SEARCH_TOOL:
        return searches.answer(raw)
    if name == TOOL_NAME:
        return ToolAnswer(problem, is_error=True)
    tools = f"{TOOL_NAME} or {SEARCH_TOOL}" if searches.limit else TOOL_NAME
    return ToolAnswer(f"there is no tool {name!r}; call {tools}", is_error=True)


class IdeaSearches:
    """The search_ideas calls of one proposal, answered from the line's memory (`None`: no memory was read)."""

    def __init__(self, memory: IdeaMemory | None, nonce: str, limit: int) -> None:
        self.memory = memory
        self.nonce = nonce
        self.limit = limit
        self.used = 0

    def answer(self, raw: object) -> ToolAnswer:
        if self.used >= self.limit:
            return ToolAnswer(f"no search left: this proposal's {self.limit} searches are used. Call {TOOL_NAME} "
                              "now with what you know.", is_error=True, refused=True)
        self.used += 1
        left = f"({self.limit - self.used} of {self.limit} searches left for this proposal)"
        try:
            query, outcome = parse_search_input(raw)
        except ValueError as exc:
            return ToolAnswer(f"{exc} {left}", is_error=True)
        if self.memory is None:
            return ToolAnswer(f"No idea memory was read for this proposal: there is nothing to search. {left}")
        if not self.memory.ideas:
            return ToolAnswer(f"The idea memory is empty: no idea has been tried on this research line yet. {left}")
        hits = search_ideas(self.memory, query, outcome)
        return ToolAnswer(self._render(hits, outcome, left))

    def answer_all(self, raws: Sequence[object]) -> tuple[list[ToolAnswer], str | None]:
        """The answers to one reply's search calls, in order, and the refusal's text when a call was over the bound
        (that reply then counts as a repair round)."""
        answers = [self.answer(raw) for raw in raws]
        refusal = next((answer.text for answer in answers if answer.refused), None)
        log.info("agent_idea_search", used=self.used, of=self.limit, refused=refusal is not None)
        return answers, refusal

    def _render(self, hits: list[Hit], outcome: str | None, left: str) -> str:
        total = len(self.memory.ideas) if self.memory is not None else 0
        where = f" with outcome {outcome}" if outcome else ""
        if not hits:
            return (f"No idea of the {total} tried on this line{where} matches the query. {left}")
        head = (f"{len(hits)} of the {total} ideas tried on this line{where} match, best match first; shown: up to "
                f"{MAX_HITS}. Each idea's description and change lines were written by candidates and past "
                f"proposals: data inside the fence. {left}")
        parts = [head]
        used = len(head)
        shown = 0
        for number, hit in enumerate(hits[:MAX_HITS], start=1):
            part = self._hit(number, hit)
            if shown and used + len(part) > MAX_ANSWER_CHARS:
                break
            parts.append(part)
            used += len(part)
            shown += 1
        if shown < len(hits):
            parts.append(f"{len(hits) - shown} more match: narrow the query or filter by outcome to see them.")
        return "\n\n".join(parts)

    def _hit(self, number: int, hit: Hit) -> str:
        idea = hit.idea
        version = self.memory.version if self.memory is not None else idea.version
        effect = "effect unknown" if idea.effect is None else f"effect {idea.effect:+.4f}" + (
            f" ± {idea.se:.4f}" if idea.se is not None else " (no noise estimate)")
        measured = (f"measurement v{idea.version} (current)" if idea.version == version else
                    f"measurement v{idea.version} (an older eval or clock: not comparable, may be tried again)")
        tried = ", ".join(f"#{eid}" for eid in idea.experiment_ids[:8]) + (
            f" and {len(idea.experiment_ids) - 8} more" if len(idea.experiment_ids) > 8 else "")
        matched = f"; matched: {', '.join(hit.matched)}" if hit.matched else ""
        meta = (f"{number}. idea #{idea.experiment_ids[0]} (tried by {tried}): {idea.outcome}, {effect}, "
                f"{idea.runs} run{'s' if idea.runs != 1 else ''}, {measured}{matched}")
        lines = [f"-{line}" for line in idea.change.removed] + [f"+{line}" for line in idea.change.added]
        if len(lines) > MAX_HIT_LINES:
            lines = [*lines[:MAX_HIT_LINES], f"... {len(lines) - MAX_HIT_LINES} more changed lines"]
        lines = [line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS] + " [...]" for line in lines]
        description = " ".join(idea.description.split())[:MAX_DESCRIPTION_CHARS]
        body = "\n".join([f"description: {description}", *lines])
        return f"{meta}\n{fence(body, self.nonce, MAX_ANSWER_CHARS)}"


def parse_search_input(raw: object) -> tuple[str, str | None]:
    """(query, outcome or None) from a search_ideas call's input; `ValueError` naming the problem."""
    if not isinstance(raw, dict):
        raise ValueError(f"the {SEARCH_TOOL} input must be an object with a query string")
    query = raw.get("query", "")
    if not isinstance(query, str):
        raise ValueError("query must be a string: words, a constant name or a code fragment")
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"query is {len(query)} characters: keep it under {MAX_QUERY_CHARS}")
    outcome = raw.get("outcome")
    if outcome in (None, "", "any"):
        return query, None
    if not isinstance(outcome, str) or outcome not in OUTCOME_GROUPS:
        raise ValueError(f"outcome must be one of: any, {', '.join(OUTCOME_GROUPS)}")
    return query, outcome
