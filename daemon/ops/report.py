"""The morning report: what a night of research found, as markdown + a PNG chart + results.tsv.

`write_report(store, session_id, out_dir)` writes, into `out_dir/session-<id>/`:
  report.md     first the night gain as re-tested on fresh seeds (Δ ± CI) and the keeps that held or not
                (`daemon.ops.retest_report`); then experiments by status, best val_bpb (a mean of runs) and its delta vs the baseline, noise,
                GPU hours, agent cost, the kept changes in order (description, delta), why each was kept
                (the judge's numbers), the closest near-misses, the best diff
  val_bpb.png   val_bpb per experiment: the kept staircase, discarded runs as dots, crashes along the bottom
  results.tsv   the original experiment's format (`Store.results_tsv`)
and returns the path of report.md. `val_bpb_series` is the chart's data, shared with the status page.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from daemon.errors import AutoresearchError
from daemon.ops.logs import get_logger
from daemon.ops.retest_report import confidence_of, retest_section
from daemon.research import archive, measurements
from daemon.research.step_spread import step_spread
from daemon.store import TERMINAL_STATUSES, ExperimentRecord, SessionRecord, Store

log = get_logger("autoresearch.report")

# Runs that produced no trustworthy number: drawn as marks along the bottom of the chart.
FAILED_STATUSES = frozenset({"crashed", "timeout", "oom", "invalid", "interrupted", "preempted"})
_ALL_EXPERIMENTS = 1_000_000  # list_experiments needs a limit; a night has hundreds


@dataclass(frozen=True)
class ChartPoint:
    """One finished experiment on the chart: x is its position in the session (1-based, by id)."""

    x: int
    experiment_id: int
    kind: str
    status: str
    val_bpb: float | None
    best_so_far: float | None  # the staircase value after this experiment

    @property
    def failed(self) -> bool:
        return self.status in FAILED_STATUSES


def val_bpb_series(experiments: Sequence[ExperimentRecord]) -> list[ChartPoint]:
    """Finished experiments in id order, each with the best kept val_bpb so far (the staircase)."""
    finished = sorted((e for e in experiments if e.status in TERMINAL_STATUSES), key=lambda e: e.id)
    points: list[ChartPoint] = []
    best: float | None = None
    for x, record in enumerate(finished, start=1):
        value = record.val_bpb if record.val_bpb is not None and math.isfinite(record.val_bpb) else None
        if record.status == "kept" and value is not None and (best is None or value < best):
            best = value
        points.append(ChartPoint(x, record.id, record.kind, record.status, value, best))
    return points


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside `text`, so a diff cannot close it early."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _cell(text: str, limit: int = 160) -> str:
    """One markdown table cell from LLM-written text: one line, no table breaks, no raw HTML."""
    flat = " ".join(text.split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return flat.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;") or "-"


def _bpb(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _delta(value: float, reference: float) -> str:
    return f"{value - reference:+.6f} ({(value - reference) / reference * 100:+.2f}%)"


def _hours(records: Sequence[ExperimentRecord]) -> float:
    total = timedelta(0)
    for record in records:
        if record.started_at is not None and record.finished_at is not None:
            total += record.finished_at - record.started_at
    return total.total_seconds() / 3600


def _session_cost(store: Store, session: SessionRecord) -> float:
    spent = store.cost_since(session.started_at)
    if session.ended_at is not None:
        spent -= store.cost_since(session.ended_at)
    return max(spent, 0.0)


def _markdown(store: Store, session: SessionRecord, experiments: list[ExperimentRecord], chart_name: str) -> str:
    baseline = store.baseline(session.id)
    best = store.best(session.id)
    noise = store.noise_floor(session.id)
    best_runs = measurements.incumbent_runs(experiments, best) if best is not None else []
    best_value = sum(best_runs) / len(best_runs) if best_runs else (best.val_bpb if best is not None else None)
    baseline_runs = measurements.incumbent_runs(experiments, baseline) if baseline is not None else []
    baseline_value = sum(baseline_runs) / len(baseline_runs) if baseline_runs else (
        baseline.val_bpb if baseline is not None else None)
    by_status = Counter(e.status for e in experiments)
    kept = sorted((e for e in experiments if e.status == "kept"), key=lambda e: e.id)
    lines = [
        f"# autoresearch report: session {session.id} ({_cell(session.tag)})",
        "",
        *retest_section(store, session.id, experiments, confidence_of(session.config)),
        f"- started: {session.started_at:%Y-%m-%d %H:%M %Z}, "
        + (f"ended: {session.ended_at:%Y-%m-%d %H:%M %Z} ({session.status})" if session.ended_at else "still open"),
        f"- trigger: {_cell(session.trigger)}",
        f"- experiments: {len(experiments)}",
        f"- best val_bpb: {_bpb(best_value)}"
        + (f" (experiment {best.id}; mean of {len(best_runs)} run{'s' if len(best_runs) != 1 else ''})"
           if best else ""),
        f"- baseline val_bpb: {_bpb(baseline_value)}"
        + (f" (mean of {len(baseline_runs)} run{'s' if len(baseline_runs) != 1 else ''})" if baseline_runs else ""),
    ]
    if best_value is not None and baseline_value is not None:  # like with like: a mean of fresh runs on both sides
        lines.append(f"- delta vs baseline: {_delta(best_value, baseline_value)}")
    if noise.n:
        lines.append(f"- noise floor: mean {_bpb(noise.mean)}, std {noise.std:.6f} over {noise.n} runs")
    else:
        lines.append("- noise floor: not measured")
    pooled = measurements.noise_of(experiments)
    if pooled.df:
        lines.append(f"- pooled noise (every repeat: noise runs, confirmations, re-measures): sigma {pooled.sigma:.6f}, "
                     f"df {pooled.df}")
    spread = step_spread(experiments)
    if spread is not None:
        lines.append(f"- {'WARNING: ' if spread.loaded else ''}steps per repeat: {spread.text()}")
    gpu_runs = [e for e in experiments if e.gpu_uuid]
    cpu_runs = [e for e in experiments if not e.gpu_uuid]
    lines.append(f"- GPU hours: {_hours(gpu_runs):.2f}" + (f" (plus {_hours(cpu_runs):.2f} CPU lane hours)"
                                                         if _hours(cpu_runs) > 0 else ""))
    lines.append(f"- agent cost: ${_session_cost(store, session):.2f}")
    lines += ["", "## Experiments by status", "", "| status | count |", "|---|---|"]
    lines += [f"| {status} | {count} |" for status, count in sorted(by_status.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines += ["", "## val_bpb per experiment", "", f"![val_bpb per experiment]({chart_name})", ""]
    lines += ["## Kept changes, in order", ""]
    if kept:
        lines += ["| # | experiment | kind | val_bpb | delta vs previous | description |", "|---|---|---|---|---|---|"]
        previous: float | None = None
        for step, record in enumerate(kept, start=1):
            delta = (_delta(record.val_bpb, previous)
                     if record.val_bpb is not None and previous is not None else "-")
            lines.append(f"| {step} | {record.id} | {record.kind} | {_bpb(record.val_bpb)} | {delta} | "
                         f"{_cell(record.description)} |")
            if record.val_bpb is not None:
                previous = record.val_bpb
    else:
        lines.append("No experiment was kept.")
    lines += _keep_explanations(kept)
    lines += _near_miss_section(experiments)
    lines += ["", "## Best diff (against the baseline)", ""]
    if best is not None and best.diff.strip():
        fence = _fence(best.diff)
        lines += [f"{fence}diff", best.diff.rstrip("\n"), fence]
    elif best is not None:
        lines.append("The best is the baseline itself: no diff.")
    else:
        lines.append("No best yet.")
    lines += _smoke_section(store, session, experiments)
    lines += _agent_section(store, session)
    lines += _notebook_section(store, session)
    return "\n".join(lines) + "\n"


def _smoke_section(store: Store, session: SessionRecord, experiments: list[ExperimentRecord]) -> list[str]:
    """Crashes caught by the seconds-long smoke runs against those that cost a full run."""
    counts = store.smoke_counts(session.id)
    full = sum(1 for e in experiments if e.kind == "candidate" and e.status in ("crashed", "timeout", "oom", "invalid"))
    caught = sum(count for status, count in counts.items() if status not in ("passed", "running"))
    lines = ["", "## Smoke runs", ""]
    if not counts:
        return [*lines, f"No smoke runs (candidate failures in full runs: {full})."]
    outcome = ", ".join(f"{status} {count}" for status, count in sorted(counts.items()))
    return [*lines, f"- smoke runs: {sum(counts.values())} ({outcome})",
            f"- candidate failures caught by a smoke run (seconds each): {caught}",
            f"- candidate failures that cost a full run: {full}"]


def _agent_section(store: Store, session: SessionRecord) -> list[str]:
    """LLM calls by outcome, and how many proposals the offline agent made while the LLM was capped or down."""
    outcomes = store.agent_call_outcomes(session.id)
    if not outcomes:
        return []
    fallback = outcomes.get(("offline", "fallback"), 0)
    llm = ", ".join(f"{provider} {outcome} {count}" for (provider, outcome), count in sorted(outcomes.items())
                    if provider != "offline")
    lines = ["", "## Agent", "", f"- LLM calls: {llm or 'none'}"]
    if fallback:
        lines.append(f"- **{fallback} proposal(s) came from the offline agent** because the LLM was capped or "
                     "down (agent.fallback); the LLM was tried again meanwhile")
    return lines


def _notebook_section(store: Store, session: SessionRecord) -> list[str]:
    """The research line's notebook as the agent left it (LLM-written: shown verbatim inside a fence)."""
    lines = ["", "## The agent's notebook", ""]
    line = store.line_of(session.id)
    entry = store.notebook(line) if line is not None else None
    if line is None or entry is None:
        return [*lines, "The notebook is empty."]
    nights = len(store.line_sessions(line))
    lines.append(f"Research line {line} ({nights} session{'s' if nights != 1 else ''}); version {entry.id} by "
                 f"{entry.author}, {entry.created_at:%Y-%m-%d %H:%M %Z}. Edit it with `autoresearch notebook edit`.")
    fence = _fence(entry.text)
    return [*lines, "", f"{fence}text", entry.text.rstrip("\n"), fence]


def _keep_explanations(kept: Sequence[ExperimentRecord]) -> list[str]:
    """Why each change was kept: the judge's rule and numbers, as stored with its verdict."""
    judged = [record for record in kept if record.verdict]
    if not judged:
        return []
    lines = ["", "## Why each change was kept", "",
             "A keep is a one-sided t-test: the candidate's runs against the best's runs (seed-paired differences "
             "when every look has a partner on the same seed and pairing pays, else means with sigma pooled from "
             "every repeat of the line); p must be below the look's alpha (the false-keep target spread over the "
             "looks). `simpler`: removes code and a non-inferiority test shows it costs less than the simplicity "
             "margin (docs/judge.md).", "",
             "| experiment | rule | runs (candidate vs best) | mean improvement | margin | sigma (df) | t | p vs alpha |",
             "|---|---|---|---|---|---|---|---|"]
    for record in judged:
        verdict = record.verdict or {}
        lines.append(
            f"| {record.id} | {_cell(str(verdict.get('rule', '-')), 30)} | {_num(verdict.get('n'), 'd')} vs "
            f"{_num(verdict.get('n_incumbent'), 'd')} | {_num(verdict.get('improvement'), '.6f')} | "
            f"{_num(verdict.get('margin'), '.6f')} | {_num(verdict.get('sigma'), '.6f')} "
            f"({_num(verdict.get('df'), 'd')}) | {_num(verdict.get('t'), '.2f')} | "
            f"{_num(verdict.get('p'), '.4f')} vs {_num(verdict.get('alpha'), '.4f')} |")
    return lines


def _near_miss_section(experiments: Sequence[ExperimentRecord]) -> list[str]:
    """The closest discarded changes (the archive the planner re-tries on a new best)."""
    misses = archive.near_misses(experiments, limit=5)
    if not misses:
        return []
    lines = ["", "## Closest near-misses", "", "| experiment | t | mean improvement | runs | description |",
             "|---|---|---|---|---|"]
    lines += [f"| {miss.experiment_id} | {miss.t:.2f} | {miss.improvement:.6f} | {miss.n} | "
              f"{_cell(miss.description)} |" for miss in misses]
    return lines


def _num(value: object, spec: str) -> str:
    """A number from a stored verdict (JSON), formatted; '-' when missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return format(int(value) if spec == "d" else value, spec)


def write_chart(points: Sequence[ChartPoint], path: Path, title: str) -> Path:
    """PNG of val_bpb per experiment: staircase of the best, kept points, discarded dots, failures at the bottom."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure with the Agg canvas: no pyplot global state, safe from the daemon's threads.
    figure = Figure(figsize=(10, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    measured = [(p.x, p.val_bpb, p.status == "kept") for p in points if p.val_bpb is not None]
    if measured:
        stair = [(p.x, p.best_so_far) for p in points if p.best_so_far is not None]
        axes.step([x for x, _ in stair], [y for _, y in stair], where="post", color="tab:green",
                  linewidth=2, label="best so far")
        axes.scatter([x for x, _, kept in measured if not kept], [y for _, y, kept in measured if not kept],
                     s=18, color="tab:gray", alpha=0.7, label="discarded / measured", zorder=3)
        axes.scatter([x for x, _, kept in measured if kept], [y for _, y, kept in measured if kept],
                     s=44, color="tab:green", edgecolors="black", label="kept", zorder=4)
        low, high = min(y for _, y, _ in measured), max(y for _, y, _ in measured)
        margin = (high - low) * 0.08 or abs(high) * 0.01 or 0.01
        axes.set_ylim(low - 2 * margin, high + margin)
    else:
        axes.text(0.5, 0.5, "no evaluated experiment yet", ha="center", va="center", transform=axes.transAxes)
    failed = [p for p in points if p.failed]
    if failed:
        bottom = axes.get_ylim()[0]
        axes.scatter([p.x for p in failed], [bottom] * len(failed), marker="x", s=40, color="tab:red",
                     clip_on=False, label="crashed / timeout / oom / invalid", zorder=5)
    axes.set_xlabel("experiment (session order)")
    axes.set_ylabel("val_bpb (lower is better)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if points:
        axes.set_xlim(0.5, len(points) + 0.5)
        axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def write_report(store: Store, session_id: int, out_dir: Path) -> Path:
    """Write report.md, val_bpb.png and results.tsv under `out_dir/session-<id>/`; return report.md's path."""
    session = store.get_session(session_id)
    if session is None:
        latest = store.latest_session()
        raise AutoresearchError(
            f"session {session_id} does not exist",
            hint=(f"the latest session is {latest.id}; run `autoresearch report --session {latest.id}`"
                  if latest is not None else "no session has run yet: run `autoresearch once` first"),
        )
    folder = out_dir / f"session-{session.id}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutoresearchError(f"cannot create the report folder {str(folder)!r}: {exc.strerror}",
                                hint="pass a writable folder with --out") from None
    experiments = store.list_experiments(session_id=session.id, limit=_ALL_EXPERIMENTS)
    points = val_bpb_series(experiments)
    chart = write_chart(points, folder / "val_bpb.png", f"session {session.id} ({session.tag}): val_bpb")
    (folder / "results.tsv").write_text(store.results_tsv(session.id))
    report = folder / "report.md"
    report.write_text(_markdown(store, session, experiments, chart.name))
    log.info("report written", path=str(report), experiments=len(experiments))
    return report
