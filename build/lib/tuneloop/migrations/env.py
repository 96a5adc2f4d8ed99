"""Alembic environment: runs migrations on the connection tuneloop hands over (see tuneloop.store)."""

from __future__ import annotations

from alembic import context

from tuneloop.tables import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
