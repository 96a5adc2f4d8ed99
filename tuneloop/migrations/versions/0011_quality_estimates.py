"""Quality estimates before labels: each captured answer's label log-probabilities, the calibrators fitted per
adapter version, and the estimates per window.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("traffic") as batch:
        batch.add_column(sa.Column("signal", sa.JSON(), nullable=True))
    op.create_table(
        "answer_calibrations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task", sa.String(100), nullable=False, index=True),
        sa.Column("adapter_version", sa.Integer, nullable=False),
        sa.Column("dataset_ref", sa.String(300), nullable=False),
        sa.Column("method", sa.String(20), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("task", "adapter_version", name="uq_answer_calibration"),
    )
    op.create_table(
        "quality_estimates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("task", sa.String(100), nullable=False, index=True),
        sa.Column("adapter_version", sa.Integer, nullable=True),
        sa.Column("metric", sa.String(40), nullable=False),
        sa.Column("method", sa.String(30), nullable=False),
        sa.Column("window", sa.Integer, nullable=False),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("ci_lower", sa.Float, nullable=True),
        sa.Column("ci_upper", sa.Float, nullable=True),
        sa.Column("level", sa.Float, nullable=False),
        sa.Column("n_labelled", sa.Integer, nullable=False),
        sa.Column("n_unlabelled", sa.Integer, nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("quality_estimates")
    op.drop_table("answer_calibrations")
    with op.batch_alter_table("traffic") as batch:
        batch.drop_column("signal")
