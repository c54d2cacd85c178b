"""Training: each run's record, the one-at-a-time lock, and the adapter a channel trains.

`training_runs` keeps every run (who asked, on which quotes, the held-out losses, the outcome).
`training_lock` holds at most one row: the process training now, with a lease it renews; a
holder that died loses it when the lease expires. `channels.train_adapter` names the adapter a
channel's trainings produce (set by its first training).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("server", sa.String(64), nullable=False),
        sa.Column("channel", sa.String(100), nullable=False),
        sa.Column("adapter", sa.String(64), nullable=True),
        sa.Column("version", sa.String(16), nullable=True),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("requested_by", sa.String(32), nullable=True),
        sa.Column("holder", sa.String(100), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=True),
        sa.Column("data_as_of", sa.DateTime, nullable=True),
        sa.Column("steps", sa.Integer, nullable=True),
        sa.Column("quote_ids", sa.Text, nullable=False, server_default="[]"),
        sa.Column("base_loss", sa.Float, nullable=True),
        sa.Column("current_loss", sa.Float, nullable=True),
        sa.Column("new_loss", sa.Float, nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'promoted', 'kept', 'failed', 'cancelled', 'interrupted')",
            name="ck_training_runs_status",
        ),
    )
    op.create_index("ix_training_runs_channel", "training_runs", ["server", "channel", "id"])
    op.create_table(
        "training_lock",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("holder", sa.String(100), nullable=False),
        sa.Column("run_id", sa.Integer, nullable=True),
        sa.Column("server", sa.String(64), nullable=True),
        sa.Column("channel", sa.String(100), nullable=True),
        sa.Column("acquired_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
    )
    with op.batch_alter_table("channels") as batch:
        batch.add_column(sa.Column("train_adapter", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("channels") as batch:
        batch.drop_column("train_adapter")
    op.drop_table("training_lock")
    op.drop_index("ix_training_runs_channel", "training_runs")
    op.drop_table("training_runs")
