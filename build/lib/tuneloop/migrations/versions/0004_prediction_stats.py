"""Per-example sufficient statistics of every metric, so comparisons read what was scored instead of re-scoring.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("eval_predictions") as batch:
        batch.add_column(sa.Column("stats", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("eval_predictions") as batch:
        batch.drop_column("stats")
