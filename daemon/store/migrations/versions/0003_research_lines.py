"""Research lines and the notebook: sessions that continue one another, and the agent's notes across nights.

`research_lines` (one row per line), `session_lines` (which line a session belongs to), `notebook_entries`
(every version of a line's notebook, by the agent or a researcher; the newest is the notebook), `smoke_runs`
(each candidate's seconds-long smoke run before its full run: outcome, seconds, error, output tail).

Revision ID: 0003_research_lines
Revises: 0002_judge_verdicts
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_research_lines"
down_revision = "0002_judge_verdicts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "research_lines",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False, unique=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "session_lines",
        sa.Column("session_id", sa.Integer(), sa.ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("line_id", sa.Integer(), sa.ForeignKey("research_lines.id", ondelete="CASCADE"), nullable=False),
    )
    op.create_index("ix_session_lines_line_id", "session_lines", ["line_id"])
    op.create_table(
        "notebook_entries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False, unique=True),
        sa.Column("line_id", sa.Integer(), sa.ForeignKey("research_lines.id", ondelete="CASCADE"), nullable=False),
        sa.Column("session_id", sa.Integer(), sa.ForeignKey("sessions.id", ondelete="SET NULL"), nullable=True),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id", ondelete="SET NULL"), nullable=True),
        sa.Column("author", sa.String(50), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_notebook_entries_line_id", "notebook_entries", ["line_id"])
    op.create_table(
        "smoke_runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False, unique=True),
        sa.Column("session_id", sa.Integer(), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("repair_round", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("source_hash", sa.String(64), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("log_tail", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_smoke_runs_session_id", "smoke_runs", ["session_id"])


def downgrade() -> None:
    op.drop_index("ix_smoke_runs_session_id", table_name="smoke_runs")
    op.drop_table("smoke_runs")
    op.drop_index("ix_notebook_entries_line_id", table_name="notebook_entries")
    op.drop_table("notebook_entries")
    op.drop_index("ix_session_lines_line_id", table_name="session_lines")
    op.drop_table("session_lines")
    op.drop_table("research_lines")
