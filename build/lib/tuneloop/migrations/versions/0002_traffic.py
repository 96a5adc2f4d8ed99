"""Captured gateway traffic.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "traffic",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("request_id", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("task", sa.String(100), nullable=False, index=True),
        sa.Column("adapter_version", sa.Integer, nullable=True),
        sa.Column("route", sa.String(20), nullable=False),
        sa.Column("endpoint", sa.String(20), nullable=False),
        sa.Column("prompt_text", sa.Text, nullable=False),
        sa.Column("messages", sa.JSON, nullable=False),
        sa.Column("completion", sa.Text, nullable=True),
        sa.Column("prompt_tokens", sa.Integer, nullable=True),
        sa.Column("completion_tokens", sa.Integer, nullable=True),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("shadow_of", sa.String(64), nullable=True),
        sa.Column("pii", sa.JSON, nullable=False),
        sa.Column("reference", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("traffic")
