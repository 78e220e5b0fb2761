"""Initial schema: sessions, experiments, agent calls, noise measurements.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _timestamp(name: str, nullable: bool) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False, unique=True),
        sa.Column("change_id", sa.String(36), nullable=True),
        sa.Column("tag", sa.String(200), nullable=False),
        sa.Column("trigger", sa.String(50), nullable=False),
        sa.Column("program_md", sa.Text(), nullable=False),
        sa.Column("program_sha256", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        _timestamp("started_at", nullable=False),
        _timestamp("ended_at", nullable=True),
    )
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False, unique=True),
        sa.Column("change_id", sa.String(36), nullable=True),
        sa.Column("session_id", sa.Integer(), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("parent_id", sa.Integer(), sa.ForeignKey("experiments.id", ondelete="SET NULL"), nullable=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("lane", sa.String(100), nullable=True),
        sa.Column("gpu_uuid", sa.String(100), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("hypothesis", sa.Text(), nullable=False),
        sa.Column("diff", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("source_sha256", sa.String(64), nullable=False),
        sa.Column("source_hash", sa.String(64), nullable=False),
        sa.Column("commit", sa.String(64), nullable=False),
        sa.Column("val_bpb", sa.Float(), nullable=True),
        sa.Column("training_seconds", sa.Float(), nullable=True),
        sa.Column("total_seconds", sa.Float(), nullable=True),
        sa.Column("peak_vram_mb", sa.Float(), nullable=True),
        sa.Column("mfu_percent", sa.Float(), nullable=True),
        sa.Column("total_tokens_m", sa.Float(), nullable=True),
        sa.Column("num_steps", sa.Integer(), nullable=True),
        sa.Column("num_params_m", sa.Float(), nullable=True),
        sa.Column("depth", sa.Integer(), nullable=True),
        sa.Column("eval_seconds", sa.Float(), nullable=True),
        sa.Column("probe", sa.Text(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("oom", sa.Boolean(), nullable=False),
        sa.Column("log_tail", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        _timestamp("lease_expires_at", nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("started_at", nullable=True),
        _timestamp("finished_at", nullable=True),
    )
    op.create_index("ix_experiments_session_status", "experiments", ["session_id", "status"])
    op.create_index("ix_experiments_status_lease", "experiments", ["status", "lease_expires_at"])
    op.create_index("ix_experiments_change_id", "experiments", ["change_id"])
    op.create_table(
        "agent_calls",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False, unique=True),
        sa.Column("session_id", sa.Integer(), sa.ForeignKey("sessions.id", ondelete="SET NULL"), nullable=True),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("provider", sa.String(50), nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_read_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_write_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("latency_s", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(50), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        _timestamp("created_at", nullable=False),
    )
    op.create_index("ix_agent_calls_created_at", "agent_calls", ["created_at"])
    op.create_table(
        "noise",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(36), nullable=False, unique=True),
        sa.Column("session_id", sa.Integer(), sa.ForeignKey("sessions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id", ondelete="SET NULL"),
                  nullable=True),
        sa.Column("val_bpb", sa.Float(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        _timestamp("created_at", nullable=False),
    )
    op.create_index("ix_noise_session_id", "noise", ["session_id"])


def downgrade() -> None:
    op.drop_table("noise")
    op.drop_table("agent_calls")
    op.drop_table("experiments")
    op.drop_table("sessions")
