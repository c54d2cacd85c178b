"""Alembic migrations of the loracord database (run by `core.store.db.migrate`)."""
