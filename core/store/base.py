"""The store's foundation: settings, opening and closing the database, and channel flags.

`QuoteStore` (in `quotes.py`) builds on this. Synchronous SQLAlchemy: call it from worker threads
(`AsyncQuoteStore` does) or from the CLI, never directly from the event loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from core.errors import EmptyQuote
from core.store import db
from core.store.records import ChannelRef, ChannelState, Quote, clean
from core.store.schema import channels, quotes

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
QUOTE_COLUMNS = (*quotes.c, channels.c.server, channels.c.channel)


def _now() -> datetime:
    return datetime.now(UTC)


def to_quote(row: Row[Any]) -> Quote:
    m = row._mapping
    return Quote(
        id=m["id"],
        server=m["server"],
        channel=m["channel"],
        text=m["text"],
        author_id=m["author_id"],
        author_name=m["author_name"],
        source=m["source"],
        added_at=m["added_at"],
        added_by=m["added_by"],
        message_id=m["message_id"],
        tags=tuple(json.loads(m["tags"])) if m["tags"] else (),
        edited_at=m["edited_at"],
    )


class StoreBase:
    """The database connection and the per-channel flags (collection, training)."""

    def __init__(
        self,
        url: str,
        *,
        max_chars: int = 1000,
        daily_cap: int = 50,
        eval_percent: int = 10,
        clock: Clock = _now,
    ) -> None:
        self.url = url
        self.max_chars = max_chars
        self.daily_cap = daily_cap
        self.eval_percent = eval_percent
        self.clock = clock
        self._engine: Engine | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Self:
        """The store the settings describe (not opened yet)."""
        q = settings.quotes
        return cls(
            settings.database_url or db.default_url(settings.data_dir),
            max_chars=q.max_chars,
            daily_cap=q.daily_cap,
            eval_percent=q.eval_percent,
            **kwargs,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> Self:
        """Connect and upgrade the schema to the newest revision."""
        if self._engine is None:
            engine = db.open_engine(self.url)
            db.migrate(engine)
            self._engine = engine
        return self

    def close(self) -> None:
        """Release every connection."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (shared with APScheduler's job store)."""
        if self._engine is None:
            raise RuntimeError("the store was used before open()")
        return self._engine

    # -- channels --------------------------------------------------------------------------

    def _channel_row(self, conn: Connection, ref: ChannelRef) -> Row[Any] | None:
        where = (channels.c.server == ref.server) & (channels.c.channel == ref.channel)
        return conn.execute(sa.select(channels).where(where)).first()

    def _channel_id(self, conn: Connection, ref: ChannelRef) -> int:
        """The channel's row id, creating the row (collection off) on first sight."""
        row = self._channel_row(conn, ref)
        if row is not None:
            return int(row.id)
        values = {
            "server": ref.server,
            "channel": ref.channel,
            "collecting": False,
            "auto_train": False,
            "needs_retrain": False,
            "created_at": self.clock(),
        }
        inserted = sa.insert(channels).values(values).returning(channels.c.id)
        return int(conn.execute(inserted).scalar_one())

    def channel_state(self, ref: ChannelRef) -> ChannelState:
        """The channel's flags (defaults for a channel never seen)."""
        with self.engine.connect() as conn:
            row = self._channel_row(conn, ref)
        if row is None:
            return ChannelState(ref.server, ref.channel, False, False, False, None)
        return ChannelState(
            row.server,
            row.channel,
            row.collecting,
            row.auto_train,
            row.needs_retrain,
            row.last_trained_at,
        )

    def _set_flags(self, ref: ChannelRef, **values: Any) -> ChannelState:
        with self.engine.begin() as conn:
            channel_id = self._channel_id(conn, ref)
            conn.execute(sa.update(channels).where(channels.c.id == channel_id).values(values))
        return self.channel_state(ref)

    def set_collecting(self, ref: ChannelRef, on: bool) -> ChannelState:
        """Turn quote collection on or off in a channel (off by default)."""
        return self._set_flags(ref, collecting=on)

    def set_auto_train(self, ref: ChannelRef, on: bool) -> ChannelState:
        """Turn nightly training on or off for a channel."""
        return self._set_flags(ref, auto_train=on)

    def mark_trained(self, ref: ChannelRef, at: datetime) -> ChannelState:
        """Record that the channel's adapter was trained on its quotes as of `at`."""
        return self._set_flags(ref, last_trained_at=at, needs_retrain=False)

    def find_channel(self, channel: str) -> list[ChannelRef]:
        """Every known (server, channel) whose channel part is `channel` (a Discord id)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(channels.c.server, channels.c.channel).where(
                    channels.c.channel == channel
                )
            ).all()
        return [ChannelRef(r.server, r.channel) for r in rows]

    def retrain_needed(self) -> list[ChannelRef]:
        """Channels marked for retraining (a quote they were trained on is gone or changed)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(channels.c.server, channels.c.channel).where(channels.c.needs_retrain)
            ).all()
        return [ChannelRef(r.server, r.channel) for r in rows]

    def _prepare(self, text: str) -> tuple[str, tuple[str, ...]]:
        """Clean and cut the text; refuse it when empty."""
        cleaned = clean(text)
        if not cleaned:
            raise EmptyQuote(
                "a quote needs text: this one is empty (images, embeds and stickers are not saved)"
            )
        if len(cleaned) <= self.max_chars:
            return cleaned, ()
        cut = cleaned[: self.max_chars].rstrip()
        notice = f"the quote was cut to {len(cut)} characters (it had {len(cleaned)})"
        return cut, (notice,)
