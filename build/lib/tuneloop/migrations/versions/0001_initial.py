"""Initial schema: datasets, adapter versions, aliases, events.

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


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task", sa.String(100), nullable=False, index=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("task", "name", "version", name="uq_dataset_version"),
    )
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task", sa.String(100), nullable=False, index=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("method", sa.String(20), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("base_model_sha256", sa.String(64), nullable=False),
        sa.Column("parent_version", sa.Integer, nullable=True),
        sa.Column("card", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("task", "version", name="uq_adapter_version"),
    )
    op.create_table(
        "aliases",
        sa.Column("task", sa.String(100), primary_key=True),
        sa.Column("alias", sa.String(40), primary_key=True),
        sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapter_versions.id"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("kind", sa.String(60), nullable=False, index=True),
        sa.Column("task", sa.String(100), nullable=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    for table in ("events", "aliases", "adapter_versions", "datasets"):
        op.drop_table(table)
