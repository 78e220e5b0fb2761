"""The sandbox's own handle of each run: `experiments.sandbox_jobs`, e.g. "train:1234 eval:1235" (Slurm job ids).

Written the moment a stage is submitted, so an operator (and `scancel`) can find an experiment's jobs even
after a daemon crash; the start-up reaper finds them through their labels too.

Revision ID: 0004_sandbox_jobs
Revises: 0003_research_lines
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_sandbox_jobs"
down_revision = "0003_research_lines"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("sandbox_jobs", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("sandbox_jobs")
