"""The store's foundation: settings, opening and closing the database, and channel flags.

`QuoteStore` (in `quotes.py`) builds on this. Synchronous SQLAlchemy: call it from worker threads
(`AsyncQuoteStore` does) or from the CLI, never directly from the event loop. Every public method
runs through `_read` or `_write`: writers wait out a busy database for `busy_seconds` with
backoff, and any database failure leaves as one `StoreError` line (`guard.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import SQLAlchemyError

from core.errors import EmptyQuote, InvalidName, StoreError
from core.names import channel_name, server_name, shown
from core.store import db
from core.store.guard import describe, retry_busy
from core.store.records import ChannelRef, ChannelState, Quote, clean, normalize
from core.store.schema import channels, quotes

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
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


def to_channel_state(row: Row[Any]) -> ChannelState:
    """A `channels` row as the record the store returns."""
    return ChannelState(
        row.server,
        row.channel,
        row.collecting,
        row.auto_train,
        row.needs_retrain,
        row.last_trained_at,
        row.train_adapter,
    )


def checked(ref: ChannelRef) -> ChannelRef:
    """`ref` if both names are valid and as stored (`core.names`); defence in depth."""
    for value, canonical in ((ref.server, server_name), (ref.channel, channel_name)):
        if canonical(value) != value:
            raise InvalidName(f"{shown(value)} is not a name as stored (lowercase, without '#')")
    return ref


def insert_ignoring(conn: Connection, table: sa.Table, keys: Iterable[str]) -> Any:
    """`INSERT ... ON CONFLICT (keys) DO NOTHING` on either backend (build it with `.values`)."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(keys))
    return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(keys))


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
        busy_seconds: float = 5.0,
    ) -> None:
        self.url = url
        self.max_chars = max_chars
        self.daily_cap = daily_cap
        self.eval_percent = eval_percent
        self.clock = clock
        self.busy_seconds = busy_seconds
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
            engine = db.open_engine(self.url, busy_seconds=self.busy_seconds)
            try:
                db.migrate(engine)
            except BaseException:
                engine.dispose()
                raise
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
        """The SQLAlchemy engine. (APScheduler's job store opens its own on the same database:
        it disposes of its engine when it shuts down.)"""
        if self._engine is None:
            raise RuntimeError("the store was used before open()")
        return self._engine

    # -- transactions ----------------------------------------------------------------------

    def _failed(self, error: SQLAlchemyError, consequence: str | None) -> StoreError:
        # The full error (SQL, parameters) goes to the debug log only, never to the user.
        log.debug("database operation failed", exc_info=error)
        return describe(error, db.where(self.engine.url), consequence)

    def _read(self, work: Callable[[Connection], T]) -> T:
        """`work(conn)` in a read transaction."""

        def attempt() -> T:
            with self.engine.connect() as conn:
                return work(conn)

        try:
            return retry_busy(attempt, seconds=self.busy_seconds)
        except SQLAlchemyError as e:
            raise self._failed(e, None) from e

    def _write(
        self,
        work: Callable[[Connection], T],
        consequence: str,
        passthrough: type[SQLAlchemyError] | None = None,
    ) -> T:
        """`work(conn)` in one write transaction, run again while the database is busy.

        `consequence` ends the error line when it fails for good ("the quote was not saved");
        errors of type `passthrough` are left to the caller.
        """

        def attempt() -> T:
            with db.writer(self.engine).begin() as conn:
                return work(conn)

        try:
            return retry_busy(attempt, seconds=self.busy_seconds)
        except SQLAlchemyError as e:
            if passthrough is not None and isinstance(e, passthrough):
                raise
            raise self._failed(e, consequence) from e

    # -- channels --------------------------------------------------------------------------

    def _channel_row(self, conn: Connection, ref: ChannelRef) -> Row[Any] | None:
        where = (channels.c.server == ref.server) & (channels.c.channel == ref.channel)
        return conn.execute(sa.select(channels).where(where)).first()

    def _channel_id(self, conn: Connection, ref: ChannelRef) -> int:
        """The channel's row id, creating the row (collection off) on first sight.

        Insert-or-ignore, then read: two processes creating the same channel both get its row.
        """
        ref = checked(ref)
        values = {
            "server": ref.server,
            "channel": ref.channel,
            "collecting": False,
            "auto_train": False,
            "needs_retrain": False,
            "created_at": self.clock(),
        }
        conn.execute(insert_ignoring(conn, channels, ("server", "channel")).values(values))
        row = self._channel_row(conn, ref)
        assert row is not None, "inserted or already there"
        return int(row.id)

    def _state(self, conn: Connection, ref: ChannelRef) -> ChannelState:
        row = self._channel_row(conn, ref)
        if row is None:
            return ChannelState(ref.server, ref.channel, False, False, False, None)
        return to_channel_state(row)

    def channel_state(self, ref: ChannelRef) -> ChannelState:
        """The channel's flags (defaults for a channel never seen)."""
        return self._read(lambda conn: self._state(conn, ref))

    def _set_flags(self, ref: ChannelRef, **values: Any) -> ChannelState:
        def work(conn: Connection) -> ChannelState:
            channel_id = self._channel_id(conn, ref)
            conn.execute(sa.update(channels).where(channels.c.id == channel_id).values(values))
            return self._state(conn, ref)

        return self._write(work, f"the settings of {ref} were not changed")

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
        query = sa.select(channels.c.server, channels.c.channel).where(
            channels.c.channel == channel
        )
        rows = self._read(lambda conn: conn.execute(query).all())
        return [ChannelRef(r.server, r.channel) for r in rows]

    def retrain_needed(self) -> list[ChannelRef]:
        """Channels marked for retraining (a quote they were trained on is gone or changed)."""
        query = sa.select(channels.c.server, channels.c.channel).where(channels.c.needs_retrain)
        rows = self._read(lambda conn: conn.execute(query).all())
        return [ChannelRef(r.server, r.channel) for r in rows]

    def _prepare(self, text: str) -> tuple[str, tuple[str, ...]]:
        """Clean and cut the text; refuse it when nothing visible is left."""
        cleaned = clean(text)
        if not normalize(cleaned):
            raise EmptyQuote(
                "a quote needs text: this one is empty or only invisible characters "
                "(images, embeds and stickers are not saved)"
            )
        if len(cleaned) <= self.max_chars:
            return cleaned, ()
        cut = cleaned[: self.max_chars].rstrip()
        notice = f"the quote was cut to {len(cut)} characters (it had {len(cleaned)})"
        return cut, (notice,)
