"""Re-tests: the night's start best against its end best (and each keep against its parent) on fresh seeds.

`retests` holds one paired comparison (or a skipped one, with why); `retest_runs` its runs (arm a: the base,
arm b: the best, each pair under one seed). Re-test runs are not experiments (daemon.store.retests).

Revision ID: 0007_retest
Revises: 0006_idea_memory (the lead re-chains it onto the head when merging)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_retest"
down_revision = "0006_idea_memory"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retests",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False, unique=True),
        sa.Column("session_id", sa.Integer(), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("label", sa.String(20), nullable=False),
        sa.Column("base_id", sa.Integer(), sa.ForeignKey("experiments.id", ondelete="SET NULL"), nullable=True),
        sa.Column("best_id", sa.Integer(), sa.ForeignKey("experiments.id", ondelete="SET NULL"), nullable=True),
        sa.Column("budget_s", sa.Float(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_retests_session_id", "retests", ["session_id"])
    op.create_table(
        "retest_runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False, unique=True),
        sa.Column("retest_id", sa.Integer(), sa.ForeignKey("retests.id", ondelete="CASCADE"), nullable=False),
        sa.Column("arm", sa.String(1), nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("val_bpb", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_retest_runs_retest_id", "retest_runs", ["retest_id"])


def downgrade() -> None:
    op.drop_index("ix_retest_runs_retest_id", table_name="retest_runs")
    op.drop_table("retest_runs")
    op.drop_index("ix_retests_session_id", table_name="retests")
    op.drop_table("retests")
