"""Monitoring: drift runs and results, drift calibrations, incidents, scheduled job runs, the scheduler lease.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drift_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task", sa.String(100), nullable=False, index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("adapter_version", sa.Integer, nullable=True),
        sa.Column("window", sa.Integer, nullable=False),
        sa.Column("n_current", sa.Integer, nullable=False),
        sa.Column("n_reference", sa.Integer, nullable=False),
        sa.Column("drifted", sa.Boolean, nullable=False),
        sa.Column("false_alarm_rate", sa.Float, nullable=False),
        sa.Column("report_path", sa.Text, nullable=True),
        sa.Column("settings", sa.JSON, nullable=False),
    )
    op.create_table(
        "drift_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("drift_runs.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("view", sa.String(40), nullable=False),
        sa.Column("column", sa.String(100), nullable=False),
        sa.Column("method", sa.String(200), nullable=False),
        sa.Column("score", sa.Float, nullable=True),
        sa.Column("threshold", sa.Float, nullable=True),
        sa.Column("drifted", sa.Boolean, nullable=False),
        sa.Column("window", sa.Integer, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_table(
        "drift_calibrations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task", sa.String(100), nullable=False, index=True),
        sa.Column("reference_key", sa.String(64), nullable=False),
        sa.Column("view", sa.String(40), nullable=False),
        sa.Column("window", sa.Integer, nullable=False),
        sa.Column("alpha", sa.Float, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("null_mean", sa.Float, nullable=False),
        sa.Column("null_sd", sa.Float, nullable=False),
        sa.Column("false_alarm_rate", sa.Float, nullable=False),
        sa.Column("n_windows", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("task", "reference_key", "view", "window", "alpha", name="uq_drift_calibration"),
    )
    op.create_table(
        "incidents",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task", sa.String(100), nullable=False, index=True),
        sa.Column("rule", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("breaches", sa.Integer, nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_table(
        "job_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job", sa.String(40), nullable=False, index=True),
        sa.Column("task", sa.String(100), nullable=False, index=True),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in ("leases", "job_runs", "incidents", "drift_calibrations", "drift_results", "drift_runs"):
        op.drop_table(table)
