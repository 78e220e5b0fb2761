"""Agent calls: every LLM call with its tokens, cost, latency and outcome, for the nightly cost cap and the report."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from datetime import datetime
from typing import Protocol, TypeVar

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection

from daemon.errors import StoreError
from daemon.store.models import AgentCallRow
from daemon.store.records import AgentCallRecord
from daemon.store.values import require_aware, utcnow

T = TypeVar("T")
AGENT_CALL_COLUMNS = [getattr(AgentCallRow, f.name) for f in dataclass_fields(AgentCallRecord)]


class _Plumbing(Protocol):
    def _read(self, what: str, work: Callable[[Connection], T]) -> T: ...

    def _write(self, what: str, work: Callable[[Connection, bool], T]) -> T: ...


class AgentCallQueries:
    """The agent calls' part of `daemon.store.sql.Store` (a mixin over its transactions)."""

    def record_agent_call(self: _Plumbing, call: AgentCallRecord) -> AgentCallRecord:
        """Store one LLM call; returns it with `id` and `created_at` filled."""
        counts = {name: getattr(call, name) for name in
                  ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cost_usd", "latency_s")}
        negative = [f"{name}={value!r}" for name, value in counts.items()
                    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0)]
        if negative:
            raise StoreError(f"agent call has invalid counts: {', '.join(negative)}",
                             hint="tokens, cost and latency are finite and >= 0")
        request_id = str(uuid.uuid4())
        created_at = require_aware(call.created_at, "created_at") if call.created_at is not None else utcnow()
        values = {f.name: getattr(call, f.name) for f in dataclass_fields(AgentCallRecord) if f.name != "id"}
        values.update(created_at=created_at, request_id=request_id)
        by_request = select(*AGENT_CALL_COLUMNS).where(AgentCallRow.request_id == request_id)

        def work(conn: Connection, retried: bool) -> AgentCallRecord:
            if not retried or (row := conn.execute(by_request).first()) is None:
                conn.execute(insert(AgentCallRow).values(**values))
                row = conn.execute(by_request).one()
            return AgentCallRecord(**row._asdict())

        return self._write("record_agent_call", work)

    def cost_since(self: _Plumbing, since: datetime) -> float:
        """Dollars spent on agent calls made at or after `since`."""
        moment = require_aware(since, "since")
        query = select(func.coalesce(func.sum(AgentCallRow.cost_usd), 0.0)).where(AgentCallRow.created_at >= moment)
        return self._read("cost_since", lambda conn: float(conn.scalar(query) or 0.0))


    def agent_call_outcomes(self: _Plumbing, session_id: int) -> dict[tuple[str, str], int]:
        """(provider, outcome) -> number of agent calls of the session (e.g. ("offline", "fallback"))."""
        query = (select(AgentCallRow.provider, AgentCallRow.outcome, func.count())
                 .where(AgentCallRow.session_id == session_id)
                 .group_by(AgentCallRow.provider, AgentCallRow.outcome))
        return self._read("agent call outcomes", lambda conn: {
            (str(provider), str(outcome)): int(count) for provider, outcome, count in conn.execute(query)})
