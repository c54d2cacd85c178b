"""Quotes keep their tags (imports of the seed's english_quotes carry them) and edit time.

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
    with op.batch_alter_table("quotes") as batch:
        batch.add_column(sa.Column("tags", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("edited_at", sa.DateTime, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("quotes") as batch:
        batch.drop_column("edited_at")
        batch.drop_column("tags")
