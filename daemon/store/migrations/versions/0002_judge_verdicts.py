"""Judge verdicts and search moves: the numbers of each keep/discard decision, and a second parent.

`experiments.verdict` (JSON) holds the judge's numbers (improvement, margin, sigma, df, n, t, p, alpha, rule);
`experiments.parent2_id` is the earlier change a combine move merged onto its parent (the best).

Revision ID: 0002_judge_verdicts
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_judge_verdicts"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("verdict", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("parent2_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_experiments_parent2_id", "experiments", ["parent2_id"], ["id"],
                                 ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.drop_constraint("fk_experiments_parent2_id", type_="foreignkey")
        batch.drop_column("parent2_id")
        batch.drop_column("verdict")
