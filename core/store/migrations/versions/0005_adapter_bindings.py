"""Channels are bound to adapters: a channel's own binding, or its server's default (`*`).

`change_counters` holds one counter per polled table, bumped by every write to it: a running
bot compares it every few seconds to notice a binding changed by another process.

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
        "adapter_bindings",
        sa.Column("server", sa.String(64), primary_key=True),
        sa.Column("channel", sa.String(100), primary_key=True),
        sa.Column("adapter", sa.String(64), nullable=True),
        sa.Column("version", sa.String(16), nullable=True),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("updated_by", sa.String(32), nullable=True),
        sa.CheckConstraint(
            "adapter IS NOT NULL OR version IS NULL", name="ck_adapter_bindings_base_unversioned"
        ),
    )
    op.create_index("ix_adapter_bindings_adapter", "adapter_bindings", ["adapter"])
    counters = op.create_table(
        "change_counters",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(counters, [{"name": "adapter_bindings", "value": 0}])


def downgrade() -> None:
    op.drop_table("change_counters")
    op.drop_index("ix_adapter_bindings_adapter", "adapter_bindings")
    op.drop_table("adapter_bindings")
