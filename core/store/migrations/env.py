"""Alembic environment: runs migrations on the connection `core.store.db.migrate` passes in.

Always called from code (never the `alembic` command line), so logging is left to bot.py.
"""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=None,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
