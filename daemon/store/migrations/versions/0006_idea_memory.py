"""Idea memory: each research line's secret prompt-fence id, and the measurement version of each experiment.

`research_lines.prompt_nonce` is the nonce of the data fences in the agent's prompt (made on first use).
`idea_memory` tags each experiment with the measurement version it was measured under: the experiments
that exist when this migration runs were measured before this round's eval and clock changes (version 1).

Revision ID: 0006_idea_memory
Revises: 0005_scored_runs
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_idea_memory"
down_revision = "0005_scored_runs"
branch_labels = None
depends_on = None

VERSION_BEFORE = 1  # daemon.research.ideas.MEASUREMENT_VERSION before this round


def upgrade() -> None:
    with op.batch_alter_table("research_lines") as batch:
        batch.add_column(sa.Column("prompt_nonce", sa.String(64), nullable=True))
    op.create_table(
        "idea_memory",
        sa.Column("experiment_id", sa.Integer(), sa.ForeignKey("experiments.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("measurement_version", sa.Integer(), nullable=False),
    )
    op.execute(f"INSERT INTO idea_memory (experiment_id, measurement_version) "
               f"SELECT id, {VERSION_BEFORE} FROM experiments")


def downgrade() -> None:
    op.drop_table("idea_memory")
    with op.batch_alter_table("research_lines") as batch:
        batch.drop_column("prompt_nonce")
