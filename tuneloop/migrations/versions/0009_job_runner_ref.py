"""The runner's own name for a job (a Ray submission id), for its status, log and cancellation.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("retrain_jobs") as batch:
        batch.add_column(sa.Column("runner_ref", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("retrain_jobs") as batch:
        batch.drop_column("runner_ref")
