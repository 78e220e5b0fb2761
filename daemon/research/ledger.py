"""The ledger: every run of a research line (its sessions, night after night) as the agent reads it.

Built from the store at each proposal, oldest first: one row per experiment, its bookkeeping runs folded in
(a baseline's noise runs, a candidate's confirmations: runs, mean, the judge's t), its delta against its
parent's recorded value when it ran (a mean of runs, like the best's), the trusted summary's metrics
(steps, tokens/s, MFU, peak memory, training seconds) and the final train loss from its log, the judge's numbers when recorded (`experiments.verdict`); the diffs of kept changes
and of the near-misses that came closest; the noise sigma and the keep margin; what runs or waits on
the lanes; crash reasons and output tails. `daemon.agents.ledger_text` sizes it into the prompt.

A research line is a chain of sessions: a new session continues the line of the one before it (its
best, its ledger, its dedup, its notebook) unless started fresh (`sessions.line_id`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from daemon.agents import ChangeEntry, CrashEntry, InFlight, LedgerView, RunEntry
from daemon.config import JudgeConfig
from daemon.research import archive, measurements
from daemon.research.ideas import IDEA_KINDS, effect_of
from daemon.research.measurements import MEASURED
from daemon.research.retest import keep_notes
from daemon.store.records import ExperimentRecord, NoiseFloor

NEAR_MISSES = 3
CRASHES = 4
TAIL_LINES = 30
FAILED = ("crashed", "timeout", "oom", "invalid")
WAITING = ("queued", "running", "evaluating")
BOOKKEEPING = ("noise", "confirm", "remeasure")  # runs folded into another row or into the best's value
_LOSS = re.compile(r"\|\s*loss\s+([0-9]+\.[0-9]+)\s*\|")


class LedgerStore(Protocol):
    """What the ledger reads from `daemon.store.sql.Store`."""

    def list_experiments(self, session_id: int | None = ..., status: str | None = ..., limit: int = ...,
                         kind: str | None = ...) -> list[ExperimentRecord]: ...

    def noise_floor(self, session_id: int) -> NoiseFloor: ...


def final_loss(log_tail: str) -> float | None:
    """The last training loss the run printed (`| loss 3.1234 |`), or None."""
    found = _LOSS.findall(log_tail or "")
    return float(found[-1]) if found else None


def tokens_per_second(row: ExperimentRecord) -> float | None:
    if row.total_tokens_m is None or not row.training_seconds:
        return None
    return row.total_tokens_m * 1e6 / row.training_seconds


def verdict_line(verdict: Mapping[str, Any] | None) -> str:
    """The judge's recorded numbers in one short line ("" when none were recorded)."""
    if not verdict:
        return ""
    parts = [str(verdict.get("rule") or verdict.get("decision") or "")]
    for key, label in (("improvement", "gain"), ("margin", "needed"), ("t", "t"), ("n", "n")):
        value = verdict.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            digits = 2 if key == "t" else 6
            parts.append(f"{label} {value:.{digits}f}" if isinstance(value, float) else f"{label} {value}")
    return " ".join(part for part in parts if part)


def _tail(text: str) -> str:
    return "\n".join((text or "").strip().splitlines()[-TAIL_LINES:])


def keep_margin(sigma: float, judge: JudgeConfig) -> tuple[float, str]:
    """The improvement a single run needs (the k-sigma rule with its floor), and the rule in words."""
    k = float(getattr(judge, "k", 2.0))
    min_delta = float(getattr(judge, "min_delta", 0.0))
    return max(k * sigma, min_delta), f"about max({k:g} x sigma, {min_delta:g}); close calls get confirmation runs"


def line_rows(store: LedgerStore, session_ids: Sequence[int]) -> list[ExperimentRecord]:
    """Every experiment of the line made of `session_ids`."""
    rows: list[ExperimentRecord] = []
    for session_id in session_ids:
        rows.extend(store.list_experiments(session_id=session_id, limit=100_000))
    return rows


def build_ledger(store: LedgerStore, session_ids: Sequence[int], current_session: int,
                 judge: JudgeConfig, retests: Mapping[int, str] | None = None) -> LedgerView:
    """The ledger of the line made of `session_ids` (oldest first); in-flight work from `current_session`.
    `retests` defaults to the morning re-tests' marks of the line's keeps (a keep that did not hold says so)."""
    rows = line_rows(store, session_ids)
    if retests is None:
        retests = keep_notes(store, session_ids, rows)
    return ledger_from_rows(rows, store.noise_floor(current_session), current_session,
                            judge, nights=len(session_ids), session_ids=tuple(session_ids), retests=retests)


def ledger_from_rows(rows: Iterable[ExperimentRecord], noise: NoiseFloor, current_session: int,
                     judge: JudgeConfig, nights: int = 1, session_ids: tuple[int, ...] = (),
                     retests: Mapping[int, str] | None = None) -> LedgerView:
    """The ledger of `rows`. `retests` maps an experiment id to the morning re-test's mark for it (e.g.
    "did not hold"), shown in its row."""
    ordered = sorted(rows, key=lambda row: row.id)  # oldest first: the table only grows at its end
    by_id = {row.id: row for row in ordered}
    done = [row for row in ordered if row.status not in WAITING]
    folded = _folded_into(ordered)
    runs = tuple(_run_entry(row, ordered, by_id, folded.get(row.id, []), (retests or {}).get(row.id, ""))
                 for row in done if row.kind not in BOOKKEEPING)
    entries = {run.id: run for run in runs}
    kept = tuple(ChangeEntry(row.id, entries[row.id].val_bpb, entries[row.id].delta, row.description, row.diff,
                             (retests or {}).get(row.id, ""))
                 for row in done if row.status == "kept" and row.kind in IDEA_KINDS and row.diff
                 and row.id in entries)
    newest_first = done[::-1]
    crashes = tuple(CrashEntry(row.id, row.status, row.description, row.error, _tail(row.log_tail))
                    for row in newest_first if row.status in FAILED)[:CRASHES]
    in_flight = tuple(InFlight(row.id, row.kind, row.status, row.lane, row.description,
                               hypothesis=row.hypothesis if row.kind in IDEA_KINDS else "",
                               diff=row.diff if row.kind in IDEA_KINDS else "")
                      for row in ordered if row.status in WAITING and row.session_id == current_session)
    sigma = _recorded_sigma(newest_first)
    # The noise table's runs, else the runs of every source measured more than once (what the judge pools).
    noise_n = noise.n or sum(len(group) for group in measurements.repeat_groups(ordered) if len(group) > 1)
    if sigma is None and noise.n >= 2:
        sigma = noise.std
    margin, rule = keep_margin(sigma, judge) if sigma is not None else (None, "no noise estimate yet")
    recorded = next((row.verdict for row in newest_first if getattr(row, "verdict", None)), None)
    if recorded and isinstance(recorded.get("margin"), int | float):
        margin, rule = float(recorded["margin"]), "the margin the judge last required (its latest verdict)"
    near = _near_misses(done, entries, margin)
    measured_kinds = Counter(row.kind for row in done)
    return LedgerView(nights=nights, runs=runs, kept=kept, near_misses=near, crashes=crashes, in_flight=in_flight,
                      noise_sigma=sigma, noise_n=noise_n, keep_margin=margin, margin_rule=rule,
                      runs_recorded=len(done),
                      bookkeeping=tuple((kind, measured_kinds[kind]) for kind in BOOKKEEPING),
                      session_ids=session_ids)


def _folded_into(ordered: Sequence[ExperimentRecord]) -> dict[int, list[ExperimentRecord]]:
    """experiment id -> its bookkeeping rows: the noise runs of a baseline (same session, same source) and the
    confirmations of a candidate. Re-measures are not folded: they make the best's recorded value."""
    folded: dict[int, list[ExperimentRecord]] = {}
    baselines = {(row.session_id, row.source_hash): row.id for row in ordered if row.kind == "baseline"}
    for row in ordered:
        owner = None
        if row.kind == "confirm" and row.parent_id is not None:
            owner = row.parent_id
        elif row.kind == "noise":
            owner = row.parent_id or baselines.get((row.session_id, row.source_hash))
        if owner is not None:
            folded.setdefault(owner, []).append(row)
    return folded


def _near_misses(done: Sequence[ExperimentRecord], entries: Mapping[int, RunEntry],
                 margin: float | None) -> tuple[ChangeEntry, ...]:
    """The archive's closest calls (by the judge's t); without recorded verdicts, the smallest deltas that
    stayed within twice the keep margin of the best (or below it, without a margin)."""
    by_id = {row.id: row for row in done}
    ranked = [by_id[miss.experiment_id] for miss in archive.near_misses(done, limit=NEAR_MISSES)
              if miss.experiment_id in by_id]
    if not ranked:
        limit = 2 * margin if margin is not None else 0.0

        def delta(row: ExperimentRecord) -> float | None:
            entry = entries.get(row.id)
            return entry.delta if entry is not None else None

        close = [row for row in done if row.status == "discarded" and row.kind in IDEA_KINDS
                 and row.diff and (value := delta(row)) is not None and value < limit]
        ranked = sorted(close, key=lambda row: (delta(row) or 0.0, -row.id))[:NEAR_MISSES]
    return tuple(ChangeEntry(row.id, entries[row.id].val_bpb if row.id in entries else row.val_bpb,
                             entries[row.id].delta if row.id in entries else None, row.description, row.diff)
                 for row in ranked)


def _recorded_sigma(rows: Sequence[ExperimentRecord]) -> float | None:
    """The sigma of the judge's latest recorded verdict (pooled noise), when the judge records one."""
    for row in rows:
        verdict = getattr(row, "verdict", None)
        if verdict and isinstance(verdict.get("sigma"), int | float) and verdict["sigma"] > 0:
            return float(verdict["sigma"])
    return None


def _run_entry(row: ExperimentRecord, ordered: Sequence[ExperimentRecord], by_id: Mapping[int, ExperimentRecord],
               folded: Sequence[ExperimentRecord], retest: str) -> RunEntry:
    values = [float(r.val_bpb) for r in (row, *folded) if r.status in MEASURED and r.val_bpb is not None
              and math.isfinite(r.val_bpb)]
    mean = math.fsum(values) / len(values) if values else None
    parent = by_id.get(row.parent_id) if row.parent_id is not None else None
    delta = effect_of(ordered, row, parent)[0] if parent is not None and row.kind in IDEA_KINDS else None
    verdict = getattr(row, "verdict", None) or {}
    t = verdict.get("t") if isinstance(verdict.get("t"), int | float) else None
    return RunEntry(
        id=row.id, session_id=row.session_id, kind=row.kind, status=row.status, lane=row.lane,
        val_bpb=mean, delta=delta, num_steps=row.num_steps,
        tokens_per_s=tokens_per_second(row), mfu_percent=row.mfu_percent, peak_vram_mb=row.peak_vram_mb,
        training_seconds=row.training_seconds, final_loss=final_loss(row.log_tail),
        verdict=verdict_line(verdict), description=row.description,
        error=row.error if row.status in FAILED else "", runs=len(values), t=float(t) if t is not None else None,
        settled=not any(r.status in WAITING for r in folded), retest=retest,
    )
