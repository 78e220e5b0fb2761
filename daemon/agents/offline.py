"""The offline agent: no LLM, a hyperparameter search that edits train.py's constants through the AST.

It finds the module-level constants whose names mark them as knobs (learning rates, depth, width,
batch size, schedule ratios, weight decay, attention window pattern), perturbs the best configuration
one knob at a time (two at a time once single moves are used up), prefers directions that helped
before and avoids those that hurt or crashed, widens its steps after a run of failures, and never
proposes a candidate whose normalized source was already seen. Its edits are search/replace blocks on
whole lines, exactly like an LLM's, so the rest of the pipeline treats both agents alike.
"""

from __future__ import annotations

import ast
import hashlib
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from daemon import syntax
from daemon.agents.edits import apply_edits, normalized_hash, validate_candidate
from daemon.agents.types import Edit, HistoryItem, Proposal, ProposalContext
from daemon.errors import AgentFatal, InvalidProposal

MAX_PAIR_TRIES = 400
MAX_STEP_SCALE = 4.0
# Knob names as `_describe` writes them: module constants (MATRIX_LR) and preset entries (depth, model_dim).
_DESCRIPTION = re.compile(r"(raise|lower|set) ([A-Za-z_][A-Za-z0-9_]*) ")
_WINDOW_PATTERNS = ("L", "SL", "SSL", "SSSL", "SSSSL", "SLSL")
_FAILED = frozenset({"crashed", "timeout", "oom", "invalid"})
KnobValue = int | float | str


@dataclass(frozen=True)
class Site:
    """One literal in the source: a module constant, or one preset's entry in a dict of presets."""

    label: str  # "" for a module constant, else the preset's name
    value: KnobValue
    line_number: int  # 1-based
    col_start: int
    col_end: int
    power_form: bool  # written as 2**k in the source


@dataclass(frozen=True)
class Knob:
    name: str
    kind: str  # "lr" | "count" | "width" | "pow2" | "ratio" | "momentum" | "decay" | "window"
    sites: tuple[Site, ...]

    def moves(self, scale: float) -> list[tuple[str, tuple[KnobValue, ...]]]:
        """(direction, new value per site) one step away, the step widened by `scale`.

        A site that cannot move that way keeps its value; a move that changes no site is left out.
        """
        by_direction: dict[str, list[KnobValue]] = {}
        for index, site in enumerate(self.sites):
            for direction, value in _MOVES[self.kind](site.value, scale):
                values = by_direction.setdefault(direction, [s.value for s in self.sites])
                values[index] = value
        return [(direction, tuple(values)) for direction, values in by_direction.items()
                if any(new != site.value for new, site in zip(values, self.sites, strict=True))]


def _lr_moves(value: KnobValue, scale: float) -> Iterator[tuple[str, KnobValue]]:
    factor = 1 + 0.25 * scale
    yield "raise", _round_sig(float(value) * factor)
    yield "lower", _round_sig(float(value) / factor)


def _count_moves(value: KnobValue, scale: float) -> Iterator[tuple[str, KnobValue]]:
    step = max(1, round(scale))
    yield "raise", int(value) + step
    if int(value) - step >= 1:
        yield "lower", int(value) - step


def _width_moves(value: KnobValue, scale: float) -> Iterator[tuple[str, KnobValue]]:
    # Multiples of 32 keep the width divisible by any small head count.
    step = 32 * max(1, round(int(value) * 0.125 * scale / 32))
    yield "raise", int(value) + step
    if int(value) - step >= 32:
        yield "lower", int(value) - step


def _pow2_moves(value: KnobValue, scale: float) -> Iterator[tuple[str, KnobValue]]:
    factor = 2 ** max(1, round(scale / 2))
    yield "raise", int(value) * factor
    if int(value) // factor >= 1:
        yield "lower", int(value) // factor


def _ratio_moves(value: KnobValue, scale: float) -> Iterator[tuple[str, KnobValue]]:
    step = 0.1 * scale
    yield "raise", _round_sig(min(float(value) + step, 0.9))
    yield "lower", _round_sig(max(float(value) - step, 0.0))


def _momentum_moves(value: KnobValue, scale: float) -> Iterator[tuple[str, KnobValue]]:
    step = 0.02 * scale
    yield "raise", _round_sig(min(float(value) + step, 0.99))
    yield "lower", _round_sig(max(float(value) - step, 0.5))


def _decay_moves(value: KnobValue, scale: float) -> Iterator[tuple[str, KnobValue]]:
    if float(value) == 0.0:
        yield "raise", 0.1
        return
    yield from _lr_moves(value, scale)
    yield "lower", 0.0


def _window_moves(value: KnobValue, scale: float) -> Iterator[tuple[str, KnobValue]]:
    for pattern in _WINDOW_PATTERNS:
        yield f"set {pattern}", pattern


_MOVES: dict[str, Callable[[KnobValue, float], Iterator[tuple[str, KnobValue]]]] = {
    "lr": _lr_moves, "count": _count_moves, "width": _width_moves, "pow2": _pow2_moves,
    "ratio": _ratio_moves, "momentum": _momentum_moves, "decay": _decay_moves, "window": _window_moves,
}
_KNOB_NAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(.*_LR|LR|LEARNING_RATE)$"), "lr"),
    (re.compile(r"^(DEPTH|N_LAYERS?|NUM_LAYERS)$"), "count"),
    (re.compile(r"^(ASPECT_RATIO|MODEL_DIM|N_EMBD)$"), "width"),
    (re.compile(r"^((.*_)?BATCH(_SIZE)?|GRAD_ACCUM(_STEPS)?)$"), "pow2"),
    (re.compile(r"^(WARMUP|WARMDOWN|FINAL_LR)_(RATIO|FRAC|FRACTION)$"), "ratio"),
    (re.compile(r"^(MUON_)?MOMENTUM$"), "momentum"),
    (re.compile(r"^LOGIT_SOFTCAP$"), "lr"),
    (re.compile(r"^WEIGHT_DECAY$"), "decay"),
    (re.compile(r"^WINDOW_PATTERN$"), "window"),
)


def find_knobs(source: str) -> list[Knob]:
    """The tunable module-level constants of train.py, and the tunable entries of a dict of presets.

    A preset entry (e.g. `PRESETS = {"gpu": dict(depth=8, ...), "cpu": {...}}`) is one knob over all
    presets, because the agent does not know which preset the night runs.
    """
    knobs: list[Knob] = []
    lines = source.split("\n")
    preset_sites: dict[str, list[Site]] = {}
    for node in syntax.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if isinstance(node.value, ast.Dict):
            for label_node, entries in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(label_node, ast.Constant) and isinstance(label_node.value, str):
                    for key, value_node in _entries(entries):
                        if (site := _site(lines, label_node.value, key, value_node)) is not None:
                            preset_sites.setdefault(key, []).append(site)
        elif (site := _site(lines, "", name, node.value)) is not None:
            knobs.append(Knob(name, _kind(name) or "", (site,)))
    knobs.extend(Knob(key, _kind(key) or "", tuple(sites)) for key, sites in preset_sites.items())
    return knobs


def _entries(node: ast.expr) -> list[tuple[str, ast.expr]]:
    """(key, value node) of `dict(key=...)` or `{"key": ...}`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return [(kw.arg, kw.value) for kw in node.keywords if kw.arg is not None]
    if isinstance(node, ast.Dict):
        return [(k.value, v) for k, v in zip(node.keys, node.values, strict=True)
                if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return []


def _kind(name: str) -> str | None:
    return next((kind for pattern, kind in _KNOB_NAMES if pattern.match(name.upper())), None)


def _site(lines: list[str], label: str, name: str, value_node: ast.expr) -> Site | None:
    """The literal's location when `name` is a knob and its value suits the knob's kind, else None."""
    kind = _kind(name)
    value = _literal(value_node)
    if kind is None or value is None or value_node.end_lineno != value_node.lineno:
        return None
    if not lines[value_node.lineno - 1][:value_node.end_col_offset].isascii():
        return None  # AST columns are byte offsets; only ASCII lines index the same by characters
    if kind == "window":
        suits = isinstance(value, str) and bool(value) and set(value) <= {"S", "L"}
    elif kind in ("count", "width", "pow2"):
        suits = isinstance(value, int) and value > 0 and (kind != "pow2" or value & (value - 1) == 0)
    else:
        suits = isinstance(value, int | float) and value >= 0
    if not suits:
        return None
    # Knob values are single-line ASCII literals, so AST byte columns index the line's characters.
    segment = lines[value_node.lineno - 1][value_node.col_offset:value_node.end_col_offset]
    return Site(label, value, value_node.lineno, value_node.col_offset, value_node.end_col_offset or 0,
                power_form=bool(re.fullmatch(r"2\s*\*\*\s*\d+", segment)))


def _literal(node: ast.expr) -> KnobValue | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _literal(node.left), _literal(node.right)
        if isinstance(base, int) and isinstance(exponent, int) and 0 <= exponent <= 40:
            return int(base**exponent)
    return None


def _round_sig(value: float) -> float:
    return float(f"{value:.3g}")


def _format(site: Site, value: KnobValue) -> str:
    if isinstance(value, str):
        return repr(value)
    if site.power_form and isinstance(value, int):
        return f"2**{int(math.log2(value))}"
    if isinstance(value, float) or isinstance(site.value, float):
        return repr(float(value))
    return str(value)


def _edits_for(source: str, changes: list[tuple[Site, KnobValue]]) -> tuple[Edit, ...]:
    """One whole-line search/replace block per changed line, widened upwards until it is unique."""
    lines = source.split("\n")
    by_line: dict[int, list[tuple[Site, KnobValue]]] = {}
    for site, value in changes:
        by_line.setdefault(site.line_number, []).append((site, value))
    edits = []
    for line_number, line_changes in sorted(by_line.items()):
        # AST columns count UTF-8 bytes; knob lines are ASCII assignments, so bytes and characters agree.
        new_line = lines[line_number - 1]
        for site, value in sorted(line_changes, key=lambda change: -change[0].col_start):
            new_line = new_line[:site.col_start] + _format(site, value) + new_line[site.col_end:]
        start = line_number - 1
        search, replace = lines[start], new_line
        while source.count(search) > 1 and start > 0:
            start -= 1
            search, replace = lines[start] + "\n" + search, lines[start] + "\n" + replace
        edits.append(Edit(search=search, replace=replace))
    return tuple(edits)


def _describe(knob: Knob, direction: str, values: tuple[KnobValue, ...]) -> str:
    changed = [(site, value) for site, value in zip(knob.sites, values, strict=True) if value != site.value]
    verb = direction.split()[0]
    parts = [f"{_format(site, site.value)} -> {_format(site, value)}" + (f" ({site.label})" if site.label else "")
             for site, value in changed]
    return f"{verb} {knob.name} {', '.join(parts)}"


Move = tuple[Knob, str, tuple[KnobValue, ...]]  # knob, direction, new value per site


class OfflineAgent:
    """History-guided AST search over train.py's hyperparameters; see the module docstring."""

    name = "offline"

    def __init__(self) -> None:
        # Per session (a new night starts again from the baseline and may retry last night's ideas).
        self._session_id: int | None = None
        self._proposed: set[str] = set()  # also avoids repeats before the daemon records a proposal
        self._tried: set[tuple[str, tuple[Edit, ...]]] = set()

    def propose(self, ctx: ProposalContext) -> Proposal:
        if ctx.session_id != self._session_id:
            self._session_id = ctx.session_id
            self._proposed.clear()
            self._tried.clear()
        knobs = find_knobs(ctx.best_source)
        if not knobs:
            raise AgentFatal("the offline agent found no hyperparameter constants in train.py",
                             hint="keep constants such as MATRIX_LR or DEPTH at module level, or use the Anthropic agent")
        history = sorted(ctx.history, key=lambda item: item.id)
        scale = _step_scale(history)
        scores = _direction_scores(history)
        seed = hashlib.sha256(f"{ctx.session_id}:{ctx.best_source}:{len(ctx.seen_hashes)}:{len(self._proposed)}".encode())
        rng = random.Random(seed.digest())
        singles: list[Move] = [(knob, direction, values) for knob in knobs for direction, values in knob.moves(scale)]
        # Directions that helped come first (best score first); the rest in a score-weighted random order.
        keys = [(-max(score, 0.0), -math.exp(score) * rng.random())
                for score in (scores.get((knob.name, direction.split()[0]), 0.0) for knob, direction, _ in singles)]
        ordered = [move for _, move in sorted(zip(keys, singles, strict=True), key=lambda pair: pair[0])]
        for move in ordered:
            if (proposal := self._try(ctx, [move], scale)) is not None:
                return proposal
        for _ in range(MAX_PAIR_TRIES if len(ordered) >= 2 else 0):
            first, second = rng.sample(ordered, 2)
            if first[0].name != second[0].name and (proposal := self._try(ctx, [first, second], scale)) is not None:
                return proposal
        raise AgentFatal("the offline agent found no untried configuration near the best",
                         hint="the search is exhausted around this train.py: use the Anthropic agent or edit train.py")

    def _try(self, ctx: ProposalContext, moves: list[Move], scale: float) -> Proposal | None:
        changes = [(site, value) for knob, _, values in moves
                   for site, value in zip(knob.sites, values, strict=True) if value != site.value]
        edits = _edits_for(ctx.best_source, changes)
        # Parsing costs tens of milliseconds: remember every tried edit set instead of re-validating it.
        attempt = (hashlib.sha256(ctx.best_source.encode()).hexdigest(), edits)
        if attempt in self._tried:
            return None
        self._tried.add(attempt)
        try:
            source = apply_edits(ctx.best_source, edits)
            if normalized_hash(source) in self._proposed:
                return None
            digest = validate_candidate(source, ctx.seen_hashes)
        except InvalidProposal:
            return None
        if ctx.ideas is not None and ctx.ideas.match(ctx.best_source, source) is not None:
            return None  # a repeat of an idea the line already tried (daemon.agents.ideas)
        self._proposed.add(digest)
        description = "; ".join(_describe(knob, direction, values) for knob, direction, values in moves)
        widened = f" with steps widened x{scale:g} after recent failures" if scale > 1 else ""
        hypothesis = f"offline search: perturb the best configuration{widened}; {description} may lower val_bpb"
        return Proposal(description=description, hypothesis=hypothesis, edits=edits, source=source)


def _step_scale(history: list[HistoryItem]) -> float:
    """1 after a success, growing by 0.5 per failure since the last kept experiment (capped).

    Only judged candidates count: a discard or a failed run is a failure; bookkeeping runs (`measured`: noise,
    confirmations, re-measures) and runs not finished are no verdict on the search, and skipped."""
    failures = 0
    for item in reversed(history):
        if item.status == "kept":
            break
        failures += item.status == "discarded" or item.status in _FAILED
    return min(1.0 + 0.5 * failures, MAX_STEP_SCALE)


def _direction_scores(history: list[HistoryItem]) -> dict[tuple[str, str], float]:
    """Preference per (knob, direction) from past offline descriptions: up for wins, down for losses."""
    scores: dict[tuple[str, str], float] = {}
    for item in history:
        for direction, name in _DESCRIPTION.findall(item.description):
            if item.status == "kept":
                change = 2.0
            elif item.status in _FAILED:
                change = -2.0
            elif item.delta is not None and item.delta < 0:
                change = 0.5  # better, but within the noise
            else:
                change = -1.0
            scores[(name, direction)] = scores.get((name, direction), 0.0) + change
    return scores
