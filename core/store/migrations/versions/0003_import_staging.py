"""Imports are staged in batches, then published in one short transaction.

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
        "import_rows",
        sa.Column("import_id", sa.String(32), primary_key=True),
        sa.Column("n", sa.Integer, primary_key=True),
        sa.Column("channel_id", sa.Integer, nullable=False),
        sa.Column("author_id", sa.String(32), nullable=True),
        sa.Column("author_name", sa.String(200), nullable=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("text_key", sa.String(64), nullable=False),
        sa.Column("added_at", sa.DateTime, nullable=False),
        sa.Column("added_by", sa.String(32), nullable=True),
        sa.Column("tags", sa.Text, nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("import_rows")
