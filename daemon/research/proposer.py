"""Proposals made ahead of time: a lane's `Proposer` asks the agent in a worker thread while the lane trains.

A `Prepared` proposal remembers the best it was made against, so the session can rebase it when another
lane has kept a new best meanwhile.

With pipelining, the next proposal is written while the lane's last one trains, and may be asked for
before the last one is even recorded as an experiment. The proposal taken last is therefore added to the
next proposal's context until the store lists it: in the ledger's in-flight work (its description,
hypothesis and diff, so the agent does not repeat a direction whose result is not known yet) and in the
sources the next proposal must differ from.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from daemon.agents import Agent, CrashInfo, InFlight, Proposal, ProposalContext
from daemon.agents.edits import normalized_hash
from daemon.research.archive import unified_diff
from daemon.research.smoke import SmokeTest
from daemon.research.stop import StopCondition


@dataclass(frozen=True)
class Prepared:
    """A proposal and what it was made against."""

    proposal: Proposal
    parent_id: int | None
    fix_of: int | None  # the crashed experiment this proposal tries to fix
    base_source: str = ""  # the best's source the agent saw

    @property
    def whole_file(self) -> bool:
        return any(edit.search == "" for edit in self.proposal.edits)


class Proposer:
    """Asks the agent for a lane's next proposals in a worker thread, so they are ready when the lane is."""

    def __init__(self, agent: Agent, context: Callable[[CrashInfo | None], ProposalContext], lane: str,
                 pipelined: bool = True, smoke: SmokeTest | None = None) -> None:
        self._agent = agent
        self._smoke = smoke
        self._pipelined = pipelined
        self._context = context
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"propose-{lane}")
        self._pending: deque[Future[Prepared]] = deque()
        self._lock = threading.Lock()
        self._lane = lane
        self._taken: Prepared | None = None  # the proposal the lane took last (maybe not recorded yet)

    def _ask(self, crash: CrashInfo | None) -> Prepared:
        with self._lock:
            taken = self._taken
        ctx = with_taken(self._context(crash), taken, self._lane)
        proposal = self._agent.propose(ctx)
        if self._smoke is not None:  # seconds at tiny shapes first; failures go back to the agent
            proposal = self._smoke.vet(self._agent, ctx, proposal, unified_diff)
        return Prepared(proposal, ctx.best_id, crash.experiment_id if crash is not None else None,
                        ctx.best_source)

    def prefetch(self, crash: CrashInfo | None = None) -> None:
        """Start preparing one more proposal (a crash fix when `crash` is given)."""
        with self._lock:
            self._pending.append(self._executor.submit(self._ask, crash))

    def prepare_ahead(self) -> None:
        """Pipelining: start the next proposal now, while the lane trains (no-op when not pipelined)."""
        if self._pipelined:
            self.ensure_pending()

    def ensure_pending(self) -> None:
        with self._lock:
            empty = not self._pending
        if empty:
            self.prefetch()

    def take(self, stop: StopCondition) -> Prepared | None:
        """The oldest prepared proposal (waiting for it if needed); None when a stop came first.

        Agent errors are raised here, in the lane's thread.
        """
        self.ensure_pending()
        with self._lock:
            future = self._pending[0]
        while not future.done():
            if stop.reason() is not None:
                return None
            stop.wait(0.2)
        with self._lock:
            self._pending.popleft()
        prepared = future.result()
        with self._lock:
            self._taken = prepared
        return prepared

    def close(self) -> None:
        with self._lock:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def with_taken(ctx: ProposalContext, taken: Prepared | None, lane: str) -> ProposalContext:
    """`ctx` with the proposal its lane took last, when the store does not list it yet (see the module docstring)."""
    if taken is None or ctx.ledger is None:
        return ctx
    proposal = taken.proposal
    listed = {item.description for item in ctx.ledger.in_flight} | {run.description for run in ctx.ledger.runs}
    if proposal.description in listed:
        return ctx
    item = InFlight(0, "candidate", "taken", lane, proposal.description, hypothesis=proposal.hypothesis,
                    diff=unified_diff(taken.base_source, proposal.source) if taken.base_source else "",
                    recorded=False)
    return replace(ctx, ledger=replace(ctx.ledger, in_flight=(*ctx.ledger.in_flight, item)),
                   seen_hashes=ctx.seen_hashes | {normalized_hash(proposal.source)})
