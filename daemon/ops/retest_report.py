"""The morning report's opening: the re-test's night gain (Δ ± CI on fresh seeds) and which keeps held.

`daemon.ops.report` puts these lines first; `night_headline` is also the webhook's and `autoresearch retest`'s
one-line answer. The numbers come from `daemon.research.retest` (paired runs on seeds no run of the night used).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from daemon.research.retest import (
    Comparison,
    comparisons,
    held_ratio,
    keep_results,
    kept_changes,
    night_result,
)
from daemon.store import ExperimentRecord

DEFAULT_CONFIDENCE = 0.95


def confidence_of(config: dict[str, Any]) -> float:
    """The interval's level as the session was configured (its stored settings snapshot)."""
    value = (config.get("retest") or {}).get("confidence") if isinstance(config, dict) else None
    return float(value) if isinstance(value, int | float) and 0.5 < value < 1 else DEFAULT_CONFIDENCE


def _cell(text: str, limit: int = 100) -> str:
    flat = " ".join(text.split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return flat.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;") or "-"


def night_headline(found: Sequence[Comparison], confidence: float = DEFAULT_CONFIDENCE) -> str:
    """'night gain: Δ -0.004100 ± 0.001900 (re-tested on 3 fresh seeds): held', or why there is no number."""
    night = night_result(found)
    if night is None:
        return "night gain: not re-tested (no re-test ran for this session; `autoresearch retest` runs one)"
    if night.retest.status == "skipped":
        return f"night gain: not re-tested: {night.retest.note}"
    if night.delta is None:
        return f"night gain: no pair of runs measured ({night.retest.note or night.retest.status})"
    level = f"{confidence * 100:g}% CI"
    partial = f"; partial: {night.retest.note}" if night.retest.status == "partial" and night.retest.note else ""
    return f"night gain: {night.line()}, {level}: {night.verdict}{partial}"


def retest_section(store: Any, session_id: int, experiments: Sequence[ExperimentRecord],
                   confidence: float = DEFAULT_CONFIDENCE) -> list[str]:
    """The report's first lines: the headline, what it compares, and the table of keeps that held or not."""
    found = comparisons(store, [session_id], confidence)
    lines = [f"**{night_headline(found, confidence)}**", ""]
    night = night_result(found)
    if night is not None and night.pairs:
        lines += [f"Start best (experiment {night.retest.base_id}) against end best (experiment "
                  f"{night.retest.best_id}), each on the same fresh seeds, run a b a b ...: mean "
                  f"{night.a_mean:.6f} → {night.b_mean:.6f} over {night.pairs} pairs"
                  + (f" ({night.failed_runs} run(s) failed)" if night.failed_runs else "")
                  + ". Negative Δ is a lower val_bpb; the gain **held** when the whole interval is below zero.", ""]
    for transfer in (c for c in found if c.retest.label == "transfer"):
        lines += [f"Transfer check at {transfer.retest.budget_s:g} s training: "
                  + (transfer.retest.note if transfer.retest.status == "skipped" else
                     f"{transfer.line()}: {transfer.verdict}"), ""]
    keeps = kept_changes(store, session_id)
    results = keep_results(found, keeps)
    if keeps:
        ratio = held_ratio(results)
        lines += ["| keep | parent | Δ when kept (night's run) | re-test Δ ± CI | held | description |",
                  "|---|---|---|---|---|---|"]
        by_id = {e.id: e for e in experiments}
        for keep in keeps:
            parent = by_id.get(keep.parent_id or -1)
            judged = (f"{keep.val_bpb - parent.val_bpb:+.6f}" if keep.val_bpb is not None and parent is not None
                      and parent.val_bpb is not None else "-")
            result = results.get(keep.id)
            numbers = "-" if result is None else (result.line() if result.pairs else _cell(result.retest.note, 60))
            verdict = "not re-tested" if result is None else result.verdict
            lines.append(f"| {keep.id} | {keep.parent_id} | {judged} | {_cell(numbers, 80)} | {verdict} | "
                         f"{_cell(keep.description)} |")
        lines += ["", f"Keeps that held: {sum(1 for c in results.values() if c.held)} of "
                  f"{sum(1 for c in results.values() if c.held is not None)} re-tested"
                  + (f" ({ratio:.0%})" if ratio is not None else "") + ". `not held`: the interval includes zero, so "
                  "the gain was not confirmed (with 3 pairs a real 2-sigma gain is confirmed only about half the time, "
                  "bench/retest_sim.py); `worse`: the interval lies above zero.", ""]
    return lines
