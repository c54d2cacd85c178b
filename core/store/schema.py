"""The database schema at the newest migration, as SQLAlchemy Core tables.

The migrations in `migrations/versions/` create and change the real tables; this module only
describes the result for queries. A change here needs a new migration beside it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Times stored as naive UTC everywhere (SQLite keeps no zone); read back as aware UTC."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("store times must be timezone-aware")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


metadata = sa.MetaData()

channels = sa.Table(
    "channels",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("server", sa.String(64), nullable=False),
    sa.Column("channel", sa.String(100), nullable=False),
    sa.Column("collecting", sa.Boolean, nullable=False),
    sa.Column("auto_train", sa.Boolean, nullable=False),
    sa.Column("needs_retrain", sa.Boolean, nullable=False),
    sa.Column("last_trained_at", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # migration 0006: the adapter this channel's trainings produce (set by its first training)
    sa.Column("train_adapter", sa.String(64), nullable=True),
    sa.UniqueConstraint("server", "channel", name="uq_channels_server_channel"),
)

quotes = sa.Table(
    "quotes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "channel_id", sa.Integer, sa.ForeignKey("channels.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("message_id", sa.String(32), nullable=True, unique=True),
    sa.Column("author_id", sa.String(32), nullable=True),
    sa.Column("author_name", sa.String(200), nullable=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("text_key", sa.String(64), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("added_at", UTCDateTime, nullable=False),
    sa.Column("added_by", sa.String(32), nullable=True),
    # migration 0002
    sa.Column("tags", sa.Text, nullable=False, server_default=""),
    sa.Column("edited_at", UTCDateTime, nullable=True),
    sa.UniqueConstraint("channel_id", "text_key", name="uq_quotes_channel_text"),
    sa.CheckConstraint(
        "source IN ('reaction', 'menu', 'command', 'import')", name="ck_quotes_source"
    ),
)
sa.Index("ix_quotes_author", quotes.c.author_id)
sa.Index("ix_quotes_added", quotes.c.channel_id, quotes.c.added_by, quotes.c.added_at)

# migration 0003: imports are written here in batches, then moved to `quotes` in one transaction
import_rows = sa.Table(
    "import_rows",
    metadata,
    sa.Column("import_id", sa.String(32), primary_key=True),
    sa.Column("n", sa.Integer, primary_key=True),
    sa.Column("channel_id", sa.Integer, nullable=False),
    sa.Column("author_id", sa.String(32), nullable=True),
    sa.Column("author_name", sa.String(200), nullable=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("text_key", sa.String(64), nullable=False),
    sa.Column("added_at", UTCDateTime, nullable=False),
    sa.Column("added_by", sa.String(32), nullable=True),
    sa.Column("tags", sa.Text, nullable=False, server_default=""),
)

# migration 0005: which adapter answers in a channel. `channel` is the channel as stored, or
# `*` for the server's default; a missing row is "not set" (inherit the default; no default:
# the base model). `adapter` NULL is the base model set explicitly; `version` NULL follows the
# adapter's latest promoted version. `updated_at` is set by every write.
SERVER_DEFAULT = "*"
adapter_bindings = sa.Table(
    "adapter_bindings",
    metadata,
    sa.Column("server", sa.String(64), primary_key=True),
    sa.Column("channel", sa.String(100), primary_key=True),
    sa.Column("adapter", sa.String(64), nullable=True),
    sa.Column("version", sa.String(16), nullable=True),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("updated_by", sa.String(32), nullable=True),
    sa.CheckConstraint(
        "adapter IS NOT NULL OR version IS NULL", name="ck_adapter_bindings_base_unversioned"
    ),
)
sa.Index("ix_adapter_bindings_adapter", adapter_bindings.c.adapter)

# migration 0005: counters bumped in the same transaction as every write to a table that running
# bots poll (`adapter_bindings`), so a poll sees every change, deletes and same-instant writes too
change_counters = sa.Table(
    "change_counters",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.BigInteger, nullable=False),
)

# migration 0006: every training run, and the lock that lets one run at a time across processes
RUN_STATUSES = ("running", "promoted", "kept", "failed", "cancelled", "interrupted")
training_runs = sa.Table(
    "training_runs",
    metadata,
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
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    # quotes added up to this time were the run's data (`quote_ids`: those it trained on)
    sa.Column("data_as_of", UTCDateTime, nullable=True),
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
sa.Index(
    "ix_training_runs_channel",
    training_runs.c.server,
    training_runs.c.channel,
    training_runs.c.id,
)

TRAINING_LOCK = "training"
training_lock = sa.Table(
    "training_lock",
    metadata,
    sa.Column("name", sa.String(16), primary_key=True),
    sa.Column("holder", sa.String(100), nullable=False),
    sa.Column("run_id", sa.Integer, nullable=True),
    sa.Column("server", sa.String(64), nullable=True),
    sa.Column("channel", sa.String(100), nullable=True),
    sa.Column("acquired_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)
