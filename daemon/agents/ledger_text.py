"""The ledger as prompt text, sized to a token budget, untrusted parts fenced as data.

Sections in order of use to the agent: the noise and keep margin, what runs on the lanes now, the runs
table (newest first; older discarded runs are the first to go when the budget is short, kept ones stay),
the diffs of kept changes, the best near-misses and the recent crashes with their output. Each section
gets a share of the budget; what one section leaves unused passes to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from daemon.agents import ChangeEntry, CrashEntry, LedgerView, RunEntry

CHARS_PER_TOKEN = 3.5  # a conservative estimate for code and tables (no tokenizer call needed)
MAX_DIFF_CHARS = 3000
MAX_CRASH_TAIL_CHARS = 1500
MAX_ROW_DESCRIPTION = 100
MAX_ROW_ERROR = 120
# Shares of the budget, in section order (the runs table first).
_SHARES = {"runs": 0.4, "kept": 0.25, "near": 0.15, "crashes": 0.2}

Fence = Callable[[str, int], str]


def estimate_tokens(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN) + 1


def render_ledger(view: LedgerView, fence: Fence, budget_tokens: int) -> str:
    """The ledger text within about `budget_tokens`; `fence(text, limit)` wraps untrusted text as data."""
    budget = int(budget_tokens * CHARS_PER_TOKEN)
    parts = [_header(view, fence)]
    left = budget - len(parts[0])
    carry = 0
    for name, render in (("runs", _runs), ("kept", _kept), ("near", _near), ("crashes", _crashes)):
        allowance = int(budget * _SHARES[name]) + carry
        text = render(view, fence, max(min(allowance, left), 0))
        if text:
            parts.append(text)
        carry = max(allowance - len(text), 0)
        left -= len(text)
    return "\n\n".join(parts)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _header(view: LedgerView, fence: Fence) -> str:
    lines = [f"# Ledger of this research line ({view.nights} night{'s' if view.nights != 1 else ''}, "
             f"{len(view.runs)} runs shown of those recorded)"]
    if view.noise_sigma is None:
        lines.append("Noise: not measured yet.")
    else:
        margin = f"; a change is kept when it beats the best by more than {view.keep_margin:.6f}" \
            if view.keep_margin is not None else ""
        lines.append(f"Noise: sigma {view.noise_sigma:.6f} val_bpb from {view.noise_n} repeat runs{margin} "
                     f"({view.margin_rule}).")
    if view.in_flight:
        rows = [f"#{item.experiment_id} {item.kind} {item.status} on lane {item.lane or '-'}: "
                f"{' '.join(item.description.split())[:MAX_ROW_DESCRIPTION]}" for item in view.in_flight]
        lines.append("Running or queued now (do not propose the same idea):\n" + fence("\n".join(rows), 4000))
    else:
        lines.append("Nothing else is running or queued.")
    return "\n".join(lines)


def _row(run: RunEntry) -> str:
    description = " ".join(run.description.split())[:MAX_ROW_DESCRIPTION]
    error = " ".join(run.error.split())[:MAX_ROW_ERROR]
    cells = [
        str(run.id), run.kind, run.status, _number(run.val_bpb, 6),
        "-" if run.delta is None else f"{run.delta:+.6f}", str(run.num_steps) if run.num_steps is not None else "-",
        _number(run.tokens_per_s, 0), _number(run.mfu_percent, 1), _number(run.peak_vram_mb, 0),
        _number(run.training_seconds, 1), _number(run.final_loss, 4), run.verdict or "-",
        description + (f" [error: {error}]" if error else ""),
    ]
    return " | ".join(cells)


def _runs(view: LedgerView, fence: Fence, allowance: int) -> str:
    title = ("# Runs, newest first (delta = val_bpb minus its parent's, negative is better; tok/s, MFU %, "
             "peak MB, train s and final train loss from the run's summary)")
    header = "id | kind | status | val_bpb | delta | steps | tok/s | MFU | peak MB | train s | loss | verdict | " \
             "description"
    rows = [_row(run) for run in view.runs]
    kept = [index for index, run in enumerate(view.runs) if run.status == "kept"]
    chosen = _fit(rows, allowance - len(title) - len(header) - 100, always=kept)
    dropped = len(rows) - len(chosen)
    table = "\n".join([header, *(rows[index] for index in chosen)])
    note = f"\n({dropped} older runs left out for length; every kept run is listed.)" if dropped else ""
    return f"{title}\n{fence(table, 10**9)}{note}" if rows else f"{title}\nNo runs yet."


def _fit(rows: Sequence[str], allowance: int, always: Sequence[int]) -> list[int]:
    """Indices of the rows to show: the `always` ones, then the newest others while they fit."""
    used = sum(len(rows[index]) + 1 for index in always)
    chosen = set(always)
    for index, row in enumerate(rows):
        if index in chosen:
            continue
        if used + len(row) + 1 > allowance:
            break
        chosen.add(index)
        used += len(row) + 1
    return sorted(chosen)


def _changes(title: str, changes: Sequence[ChangeEntry], fence: Fence, allowance: int) -> str:
    if not changes:
        return ""
    parts = [title]
    used = len(title)
    for change in changes:
        head = (f"## #{change.id}: val_bpb {_number(change.val_bpb, 6)}, delta "
                f"{'-' if change.delta is None else f'{change.delta:+.6f}'}"
                + (f" ({change.retest})" if change.retest else ""))
        room = min(MAX_DIFF_CHARS, allowance - used - len(head) - 200)
        if room < 200:
            parts.append(f"({len(changes) - len(parts) + 1} more left out for length)")
            break
        text = fence(f"{' '.join(change.description.split())[:MAX_ROW_DESCRIPTION]}\n{change.diff}", room)
        parts.append(f"{head}\n{text}")
        used += len(head) + len(text)
    return "\n".join(parts)


def _kept(view: LedgerView, fence: Fence, allowance: int) -> str:
    return _changes("# Kept changes, newest first (each diff against the best before it)", view.kept, fence,
                    allowance)


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
        text = fence(f"{' '.join(crash_entry.description.split())[:MAX_ROW_DESCRIPTION]}\n"
                     f"error: {crash_entry.error[:300]}\n{crash_entry.output_tail}", room)
        parts.append(f"## #{crash_entry.id} {crash_entry.status}\n{text}")
        used += len(parts[-1])
    return "\n".join(parts) if len(parts) > 1 else ""
