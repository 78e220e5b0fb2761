"""Scored runs for the replay guard: per source SHA-256, each scored run's seed, checkpoint SHA-256 and val_bpb.

`scored_runs` lets the replay guard (daemon.research.replay.StoredReplayGuard) remember earlier seeds across
daemon restarts and sessions. Existing experiments are not back-filled: their checkpoint hashes were never
kept, and an experiment's val_bpb may be a mean of several runs rather than one run's exact value.

Revision ID: 0005_scored_runs
Revises: 0004_sandbox_jobs
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_scored_runs"
down_revision = "0004_sandbox_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scored_runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False, unique=True),
        sa.Column("source_sha256", sa.String(64), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(64), nullable=False),
        sa.Column("val_bpb", sa.Float(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id", ondelete="SET NULL"), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_scored_runs_source_sha256", "scored_runs", ["source_sha256"])


def downgrade() -> None:
    op.drop_index("ix_scored_runs_source_sha256", table_name="scored_runs")
    op.drop_table("scored_runs")
