"""Evaluation runs, their per-example predictions, and their aggregate scores; feedback time on traffic.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_key", sa.String(64), nullable=False, index=True),
        sa.Column("task", sa.String(100), nullable=False, index=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("adapter_version", sa.Integer, nullable=True),
        sa.Column("dataset_ref", sa.String(300), nullable=False),
        sa.Column("dataset_sha256", sa.String(64), nullable=False),
        sa.Column("n_examples", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("timings", sa.JSON, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "eval_predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("eval_runs.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("example_id", sa.String(200), nullable=False),
        sa.Column("prediction", sa.Text, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=True),
        sa.Column("scores", sa.JSON, nullable=False),
        sa.UniqueConstraint("run_id", "example_id", name="uq_eval_prediction"),
    )
    op.create_table(
        "eval_scores",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("eval_runs.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("metric", sa.String(40), nullable=False),
        sa.Column("slice_field", sa.String(100), nullable=True),
        sa.Column("slice_value", sa.String(200), nullable=True),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("ci_low", sa.Float, nullable=False),
        sa.Column("ci_high", sa.Float, nullable=False),
        sa.Column("level", sa.Float, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("mde", sa.Float, nullable=True),
        sa.Column("empty", sa.Integer, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
    )
    op.add_column("traffic", sa.Column("reference_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("traffic", "reference_at")
    op.drop_table("eval_scores")
    op.drop_table("eval_predictions")
    op.drop_table("eval_runs")
