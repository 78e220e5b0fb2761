"""The ledger as prompt text, sized to a token budget, every untrusted part fenced as data.

The runs table lists one row per experiment, oldest first (bookkeeping runs folded into their row), and
only ever grows at its end. It is cut in two: `LedgerText.stable`, the rows that can no longer change, in
whole chunks of `CHUNK` rows (with the diffs of the keeps among them), which the prompt puts before a cache
breakpoint; and `LedgerText.recent`: the counts, the noise and margin, the newest rows, what is in flight,
the newer kept diffs, the near-misses and the recent failures. So the long-lived prompt
cache covers all but the newest rows, and is rewritten only when a chunk fills (or a morning re-test marks
an old row). When the table is over its share of the budget, the oldest discarded rows leave first, in
whole chunks; kept rows always stay, and the idea memory still lists every idea.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from daemon.agents.ideas import Idea, IdeaMemory
from daemon.agents.types import ChangeEntry, CrashEntry, LedgerView, RunEntry

CHARS_PER_TOKEN = 3.5  # a conservative estimate for code and tables (no tokenizer call needed)
CHUNK = 10  # rows enter the cached part of the table this many at a time
MAX_DIFF_CHARS = 3000
MAX_CRASH_TAIL_CHARS = 1500
MAX_ROW_DESCRIPTION = 100
MAX_ROW_ERROR = 120
MAX_RETEST = 40
MAX_IDEA_DESCRIPTION = 70
# Shares of the budget (the idea memory's is IDEAS_SHARE, rendered by `render_ideas`).
_SHARES = {"table": 0.45, "kept": 0.2, "near": 0.1, "crashes": 0.1}
IDEAS_SHARE = 0.15
TABLE_HEADER = ("id | night | kind | status | runs | val_bpb | delta | steps | tok/s | MFU | peak MB | train s | "
                "loss | verdict | description")

Fence = Callable[[str, int], str]


@dataclass(frozen=True)
class LedgerText:
    stable: str  # the settled rows (and their keeps' diffs): the same text until the next chunk fills
    recent: str  # everything else


def estimate_tokens(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN) + 1


def render_ledger(view: LedgerView, fence: Fence, budget_tokens: int) -> LedgerText:
    """The ledger text within about `budget_tokens`; `fence(text, limit)` wraps untrusted text as data."""
    budget = int(budget_tokens * CHARS_PER_TOKEN)
    rows = [_row(run, _night_of(view, run)) for run in view.runs]
    shown = _shown(view.runs, rows, int(budget * _SHARES["table"]))
    stable_count = _stable_count(view.runs, shown)
    stable_ids = {view.runs[index].id for index in shown[:stable_count]}
    stable_kept = [change for change in view.kept if change.id in stable_ids]
    stable = ""
    kept_text = ""
    if stable_count:
        stable = ("# Ledger, part 1: the research line's settled experiments, oldest first (one row per experiment;"
                  " delta = val_bpb minus the parent's recorded value when it ran, negative is better)\n"
                  + fence("\n".join([TABLE_HEADER, *(rows[index] for index in shown[:stable_count])]), 10**9))
        kept_text = _changes("# Kept changes among them, oldest first (each diff against the best before it)",
                             stable_kept, fence, int(budget * _SHARES["kept"]))
        stable += f"\n\n{kept_text}" if kept_text else ""
    recent_rows = [rows[index] for index in shown[stable_count:]]
    parts = [_header(view, len(shown), stable_count, fence)]
    if recent_rows:
        title = ("# Ledger, part 2: the newest experiments" if stable_count else
                 "# Ledger: the research line's experiments, oldest first (one row per experiment; delta = "
                 "val_bpb minus the parent's recorded value when it ran, negative is better)")
        parts.append(f"{title}\n" + fence("\n".join([TABLE_HEADER, *recent_rows]), 10**9))
    elif not view.runs:
        parts.append("# Ledger\n\nNo experiments finished yet.")
    newer_kept = [change for change in view.kept if change.id not in stable_ids]
    used_kept = len(kept_text)
    for text in (
        _changes("# Newer kept changes, oldest first (each diff against the best before it)", newer_kept, fence,
                 int(budget * _SHARES["kept"]) - used_kept),
        _near(view, fence, int(budget * _SHARES["near"])),
        _crashes(view, fence, int(budget * _SHARES["crashes"])),
    ):
        if text:
            parts.append(text)
    return LedgerText(stable=stable, recent="\n\n".join(parts))


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _night_of(view: LedgerView, run: RunEntry) -> int:
    return view.session_ids.index(run.session_id) + 1 if run.session_id in view.session_ids else 0


def _header(view: LedgerView, shown: int, stable: int, fence: Fence) -> str:
    folded = ", ".join(f"{runs} {kind}" for kind, runs in view.bookkeeping if runs)
    left_out = len(view.runs) - shown
    lines = [
        f"# The ledger in numbers ({view.nights} night{'s' if view.nights != 1 else ''})",
        f"{len(view.runs)} experiments finished, {view.runs_recorded} runs recorded in all"
        + (f" ({folded} runs folded: noise runs into their baseline's row, confirmations into their "
           "candidate's row, re-measures into the best's recorded value)" if folded else "")
        + f". Rows shown: {shown} ({stable} in part 1, {shown - stable} in part 2)"
        + (f"; {left_out} older discarded or failed rows left out for length (every kept row is listed; the idea "
           "memory below lists every idea)" if left_out else "") + ".",
    ]
    if view.noise_sigma is None:
        lines.append("Noise: not measured yet.")
    else:
        margin = f"; a change is kept when it beats the best by more than {view.keep_margin:.6f}" \
            if view.keep_margin is not None else ""
        lines.append(f"Noise: sigma {view.noise_sigma:.6f} val_bpb from {view.noise_n} repeat runs{margin} "
                     f"({view.margin_rule}).")
    if view.in_flight:
        blocks = []
        for item in view.in_flight:
            where = f"on lane {item.lane}" if item.lane else "waiting for a lane"
            name = f"#{item.experiment_id} {item.kind} {item.status} {where}" if item.recorded else \
                f"proposal taken by its lane ({where}), being queued"
            text = f"{name}: {' '.join(item.description.split())[:MAX_ROW_DESCRIPTION]}"
            if item.hypothesis:
                text += f"\nhypothesis: {' '.join(item.hypothesis.split())[:300]}"
            if item.diff:
                text += f"\n{item.diff[:1500]}"
            blocks.append(text)
        lines.append("Running or queued now, result not known yet (do not propose the same idea; a result that "
                     "arrives meanwhile may still change the best):\n" + fence("\n\n".join(blocks), 10_000))
    else:
        lines.append("Nothing else is running or queued.")
    return "\n".join(lines)


def _row(run: RunEntry, night: int) -> str:
    description = " ".join(run.description.split())[:MAX_ROW_DESCRIPTION]
    error = " ".join(run.error.split())[:MAX_ROW_ERROR]
    status = run.status + (f" ({' '.join(run.retest.split())[:MAX_RETEST]})" if run.retest else "")
    cells = [
        str(run.id), str(night) if night else "-", run.kind, status, str(run.runs), _number(run.val_bpb, 6),
        "-" if run.delta is None else f"{run.delta:+.6f}", str(run.num_steps) if run.num_steps is not None else "-",
        _number(run.tokens_per_s, 0), _number(run.mfu_percent, 1), _number(run.peak_vram_mb, 0),
        _number(run.training_seconds, 1), _number(run.final_loss, 4), run.verdict or "-",
        description + (f" [error: {error}]" if error else ""),
    ]
    return " | ".join(cells)


def _shown(runs: Sequence[RunEntry], rows: Sequence[str], allowance: int) -> list[int]:
    """Indices of the rows to show, oldest first: all when they fit, else without the oldest discarded or
    failed rows, dropped in whole chunks (so the cached part changes only when a chunk is dropped)."""
    size = sum(len(row) + 1 for row in rows) + len(TABLE_HEADER) + 200
    droppable = [index for index, run in enumerate(runs) if run.status != "kept"]
    dropped: set[int] = set()
    while size > allowance and len(dropped) < len(droppable):
        for index in droppable[len(dropped):len(dropped) + CHUNK]:
            dropped.add(index)
            size -= len(rows[index]) + 1
    return [index for index in range(len(rows)) if index not in dropped]


def _stable_count(runs: Sequence[RunEntry], shown: Sequence[int]) -> int:
    """How many of the shown rows go in the cached part: the settled ones before the first unsettled row,
    in whole chunks, always leaving the newest chunk in the recent part."""
    settled = 0
    for index in shown:
        if not runs[index].settled:
            break
        settled += 1
    settled = min(settled, max(len(shown) - CHUNK, 0))
    return settled - settled % CHUNK


def _changes(title: str, changes: Sequence[ChangeEntry], fence: Fence, allowance: int) -> str:
    if not changes:
        return ""
    parts = [title]
    used = len(title)
    for number, change in enumerate(changes):
        head = (f"## #{change.id}: val_bpb {_number(change.val_bpb, 6)}, delta "
                f"{'-' if change.delta is None else f'{change.delta:+.6f}'}"
                + (f" ({change.retest})" if change.retest else ""))
        room = min(MAX_DIFF_CHARS, allowance - used - len(head) - 200)
        if room < 200:
            parts.append(f"({len(changes) - number} more left out for length)")
            break
        description = " ".join(change.description.split())[:MAX_ROW_DESCRIPTION]
        text = fence(f"{description}\n{_head(change.diff, room - len(description) - 1)}", room)
        parts.append(f"{head}\n{text}")
        used += len(head) + len(text)
    return "\n".join(parts)


def _head(text: str, room: int) -> str:
    """The first `room` characters of `text` (a diff reads from its start), marked when cut."""
    return text if len(text) <= room else text[:max(room - 20, 0)] + "\n[... rest cut ...]"


def _near(view: LedgerView, fence: Fence, allowance: int) -> str:
    if not view.near_misses:
        return ""
    ids = ", ".join(str(change.id) for change in view.near_misses)
    title = ("# Near-misses: discarded changes that came closest to a keep (worth a variation or a "
             f'combination)\nTo combine one with your edits, set base to "combine:<id>"; the ids you may combine: '
             f"{ids}. The candidate is then the best with your edits plus that change (edits may be empty).")
    return _changes(title, view.near_misses, fence, allowance)


def _crashes(view: LedgerView, fence: Fence, allowance: int) -> str:
    if not view.crashes:
        return ""
    parts = ["# Recent failures, newest first (status, error, last lines of output)"]
    used = len(parts[0])
    for crash in view.crashes:
        crash_entry: CrashEntry = crash
        room = min(MAX_CRASH_TAIL_CHARS, allowance - used - 300)
        if room < 200:
            break
        head = (f"{' '.join(crash_entry.description.split())[:MAX_ROW_DESCRIPTION]}\n"
                f"error: {' '.join(crash_entry.error.split())[:300]}\n")
        tail = crash_entry.output_tail[-max(room - len(head), 0):]
        text = fence(head + tail, room)
        parts.append(f"## #{crash_entry.id} {crash_entry.status}\n{text}")
        used += len(parts[-1])
    return "\n".join(parts) if len(parts) > 1 else ""


def idea_line(idea: Idea, version: int) -> str:
    """One idea in one line: what it changed, what came of it, the runs behind it (untrusted: fence it)."""
    if idea.change.numbers:
        what = ", ".join(f"{n.name} {n.old:g}->{n.new:g}" for n in idea.change.numbers)
    else:
        targets = ", ".join(idea.change.targets[:4]) or "code"
        what = f"{targets}: {' '.join(idea.description.split())[:MAX_IDEA_DESCRIPTION]}"
    effect = "-" if idea.effect is None else f"{idea.effect:+.4f}" + (
        f"±{idea.se:.4f}" if idea.se is not None else "")
    ids = ",".join(f"#{eid}" for eid in idea.experiment_ids[:3]) + ("..." if len(idea.experiment_ids) > 3 else "")
    tag = "" if idea.version == version else f" [v{idea.version}]"
    return f"{what} | {idea.outcome} {effect} ({idea.runs} run{'s' if idea.runs != 1 else ''}) {ids}{tag}"


def render_ideas(memory: IdeaMemory, fence: Fence, budget_tokens: int) -> str:
    """The idea memory in summary: every distinct change tried on the line, newest last, within `allowance`."""
    if not memory.ideas:
        return ""
    older = sum(1 for idea in memory.ideas if idea.version != memory.version)
    title = (f"# Idea memory: every distinct change tried on this research line ({len(memory.ideas)} ideas over "
             f"{memory.nights} night{'s' if memory.nights != 1 else ''}; effect = val_bpb change against the "
             "parent's recorded value, ± its standard error"
             + (f"; {older} marked [vN] were measured under an older eval or clock: not comparable" if older else "")
             + ")\nA proposal that repeats one of these (the same change up to formatting, comments or renamed "
             "constants, or a value within 10% of one that was refused) is refused before it runs, with the idea "
             "it repeats.")
    allowance = int(budget_tokens * CHARS_PER_TOKEN * IDEAS_SHARE)
    lines = [idea_line(idea, memory.version) for idea in memory.ideas]
    used = sum(len(line) + 1 for line in lines)
    cut = 0
    while used > allowance - len(title) - 200 and cut < len(lines) - 1:  # the newest is always listed
        used -= len(lines[cut]) + 1
        cut += 1
    shown = "\n".join(lines[cut:])
    if cut:  # the older ideas in one line per name they changed, so the summary still covers every idea
        shown = (f"(older: {_summary(memory.ideas[:cut])[:max(allowance // 4, 400)]}; listed one by one: the newest "
                 f"{len(lines) - cut}; every idea is still checked)\n{shown}")
    return f"{title}\n{fence(shown, 10**9)}"


def _summary(ideas: Sequence[Idea]) -> str:
    """'NAME xN (values lo..hi, K kept)' per changed name, most tried first."""
    tried: dict[str, list[Idea]] = {}
    for idea in ideas:
        for target in idea.change.targets or ("code",):
            tried.setdefault(target, []).append(idea)
    parts = []
    for name, group in sorted(tried.items(), key=lambda item: -len(item[1])):
        values = [n.new for idea in group for n in idea.change.numbers if n.name == name]
        span = f" values {min(values):g}..{max(values):g}" if values else ""
        kept = sum(1 for idea in group if idea.outcome == "kept")
        parts.append(f"{name} x{len(group)}{span}, {kept} kept")
    return "; ".join(parts)
