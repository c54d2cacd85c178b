"""Initial schema: channels (collection and retraining flags) and quotes.

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
        "channels",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("server", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(100), nullable=False),
        sa.Column("collecting", sa.Boolean, nullable=False),
        sa.Column("auto_train", sa.Boolean, nullable=False),
        sa.Column("needs_retrain", sa.Boolean, nullable=False),
        sa.Column("last_trained_at", sa.DateTime, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("server", "channel", name="uq_channels_server_channel"),
    )
    op.create_table(
        "quotes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "channel_id",
            sa.Integer,
            sa.ForeignKey("channels.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("message_id", sa.String(32), nullable=True, unique=True),
        sa.Column("author_id", sa.String(32), nullable=True),
        sa.Column("author_name", sa.String(200), nullable=True),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("text_key", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("added_at", sa.DateTime, nullable=False),
        sa.Column("added_by", sa.String(32), nullable=True),
        sa.UniqueConstraint("channel_id", "text_key", name="uq_quotes_channel_text"),
        sa.CheckConstraint(
            "source IN ('reaction', 'menu', 'command', 'import')", name="ck_quotes_source"
        ),
    )
    op.create_index("ix_quotes_author", "quotes", ["author_id"])
    op.create_index("ix_quotes_added", "quotes", ["channel_id", "added_by", "added_at"])


def downgrade() -> None:
    op.drop_table("quotes")
    op.drop_table("channels")
