"""The ledger: every run of a research line (its sessions, night after night) as the agent reads it.

Built from the store at each proposal: each run's status, val_bpb, delta against its parent, the
trusted summary's metrics (steps, tokens/s, MFU, peak memory, training seconds) and the final train
loss from its log, the judge's numbers when recorded (`experiments.verdict`); the diffs of kept changes
and of the near-misses that came closest; the noise sigma and the keep margin; what runs or waits on
the lanes; crash reasons and output tails. `daemon.agents.ledger_text` sizes it into the prompt.

A research line is a chain of sessions: a new session continues the line of the one before it (its
best, its ledger, its dedup, its notebook) unless started fresh (`sessions.line_id`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from daemon.agents import ChangeEntry, CrashEntry, InFlight, LedgerView, RunEntry
from daemon.config import JudgeConfig
from daemon.research import archive
from daemon.research.retest import keep_notes
from daemon.store.records import ExperimentRecord, NoiseFloor

NEAR_MISSES = 3
CRASHES = 4
TAIL_LINES = 30
FAILED = ("crashed", "timeout", "oom", "invalid")
WAITING = ("queued", "running", "evaluating")
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
            parts.append(f"{label} {value:.6f}" if isinstance(value, float) else f"{label} {value}")
    return " ".join(part for part in parts if part)


def _delta(row: ExperimentRecord, by_id: Mapping[int, ExperimentRecord]) -> float | None:
    if row.val_bpb is None or row.parent_id is None:
        return None
    parent = by_id.get(row.parent_id)
    if row.kind == "confirm" and parent is not None and parent.parent_id is not None:
        parent = by_id.get(parent.parent_id)  # a confirmation repeats its candidate
    if parent is None or parent.val_bpb is None:
        return None
    return float(row.val_bpb - parent.val_bpb)


def _tail(text: str) -> str:
    return "\n".join((text or "").strip().splitlines()[-TAIL_LINES:])


def keep_margin(sigma: float, judge: JudgeConfig) -> tuple[float, str]:
    """The improvement a single run needs (the k-sigma rule with its floor), and the rule in words."""
    k = float(getattr(judge, "k", 2.0))
    min_delta = float(getattr(judge, "min_delta", 0.0))
    return max(k * sigma, min_delta), f"about max({k:g} x sigma, {min_delta:g}); close calls get confirmation runs"


def build_ledger(store: LedgerStore, session_ids: Sequence[int], current_session: int,
                 judge: JudgeConfig) -> LedgerView:
    """The ledger of the line made of `session_ids` (oldest first); in-flight work from `current_session`."""
    rows: list[ExperimentRecord] = []
    for session_id in session_ids:
        rows.extend(store.list_experiments(session_id=session_id, limit=100_000))
    return ledger_from_rows(rows, store.noise_floor(current_session), current_session, judge,
                            nights=len(session_ids), retests=keep_notes(store, session_ids, rows))


def ledger_from_rows(rows: Iterable[ExperimentRecord], noise: NoiseFloor, current_session: int,
                     judge: JudgeConfig, nights: int = 1, retests: Mapping[int, str] | None = None) -> LedgerView:
    ordered = sorted(rows, key=lambda row: row.id, reverse=True)  # newest first
    by_id = {row.id: row for row in ordered}
    done = [row for row in ordered if row.status not in WAITING]
    runs = tuple(_run_entry(row, by_id) for row in done)
    kept = tuple(ChangeEntry(row.id, row.val_bpb, _delta(row, by_id), row.description, row.diff,
                             (retests or {}).get(row.id, ""))
                 for row in done if row.status == "kept" and row.kind in ("candidate", "manual") and row.diff)
    crashes = tuple(CrashEntry(row.id, row.status, row.description, row.error, _tail(row.log_tail))
                    for row in done if row.status in FAILED)[:CRASHES]
    in_flight = tuple(InFlight(row.id, row.kind, row.status, row.lane, row.description)
                      for row in ordered if row.status in WAITING and row.session_id == current_session)
    sigma = _recorded_sigma(ordered)
    noise_n = noise.n
    if sigma is None and noise.n >= 2:
        sigma = noise.std
    margin, rule = keep_margin(sigma, judge) if sigma is not None else (None, "no noise estimate yet")
    recorded = next((row.verdict for row in ordered if getattr(row, "verdict", None)), None)
    if recorded and isinstance(recorded.get("margin"), int | float):
        margin, rule = float(recorded["margin"]), "the margin the judge last required (its latest verdict)"
    near = _near_misses(done, by_id, margin)
    return LedgerView(nights=nights, runs=runs, kept=kept, near_misses=near, crashes=crashes, in_flight=in_flight,
                      noise_sigma=sigma, noise_n=noise_n, keep_margin=margin, margin_rule=rule)


def _near_misses(done: Sequence[ExperimentRecord], by_id: Mapping[int, ExperimentRecord],
                 margin: float | None) -> tuple[ChangeEntry, ...]:
    """The archive's closest calls (by the judge's t); without recorded verdicts, the smallest deltas that
    stayed within twice the keep margin of the best (or below it, without a margin)."""
    ranked = [by_id[miss.experiment_id] for miss in archive.near_misses(done, limit=NEAR_MISSES)]
    if not ranked:
        limit = 2 * margin if margin is not None else 0.0
        close = [row for row in done if row.status == "discarded" and row.kind in ("candidate", "manual")
                 and row.diff and (delta := _delta(row, by_id)) is not None and delta < limit]
        ranked = sorted(close, key=lambda row: (_delta(row, by_id) or 0.0, -row.id))[:NEAR_MISSES]
    return tuple(ChangeEntry(row.id, row.val_bpb, _delta(row, by_id), row.description, row.diff) for row in ranked)


def _recorded_sigma(rows: Sequence[ExperimentRecord]) -> float | None:
    """The sigma of the judge's latest recorded verdict (pooled noise), when the judge records one."""
    for row in rows:
        verdict = getattr(row, "verdict", None)
        if verdict and isinstance(verdict.get("sigma"), int | float) and verdict["sigma"] > 0:
            return float(verdict["sigma"])
    return None


def _run_entry(row: ExperimentRecord, by_id: Mapping[int, ExperimentRecord]) -> RunEntry:
    return RunEntry(
        id=row.id, session_id=row.session_id, kind=row.kind, status=row.status, lane=row.lane,
        val_bpb=row.val_bpb, delta=_delta(row, by_id), num_steps=row.num_steps,
        tokens_per_s=tokens_per_second(row), mfu_percent=row.mfu_percent, peak_vram_mb=row.peak_vram_mb,
        training_seconds=row.training_seconds, final_loss=final_loss(row.log_tail),
        verdict=verdict_line(getattr(row, "verdict", None)), description=row.description,
        error=row.error if row.status in FAILED else "",
    )
