"""Consent: quotes leave the store (deleted messages, `/quote forget`) or change (edited messages).

Consent reaches the weights through `channels.needs_retrain`. Until training runs are recorded,
each channel keeps the time of its last training (`mark_trained`); removing or editing a quote that
was added at or before that time marks the channel for retraining, so the next nightly run trains
it again without the quote. A channel never trained is never marked.

Removed text is gone from disk, not only from queries: SQLite runs with `secure_delete` (freed
bytes are zeroed) and every removal or edit ends with a WAL checkpoint that truncates the log,
where the old row versions would otherwise stay. PostgreSQL keeps dead row versions until VACUUM
(see docs/store.md).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from core.errors import QuoteNotFound
from core.store.base import QUOTE_COLUMNS, StoreBase, to_quote
from core.store.records import ChannelRef, Quote, RemoveResult, clean, normalize, text_key
from core.store.schema import channels, quotes

log = logging.getLogger(__name__)

MAX_ID = 2**63 - 1
"""The largest id either database stores: a larger number names no quote."""
NOT_REMOVED = "nothing was removed"


class QuoteRemoval(StoreBase):
    """Removing and editing quotes, marking trained channels for retraining."""

    def _select(self, conn: Connection, where: sa.ColumnElement[bool]) -> list[Quote]:
        rows = conn.execute(
            sa.select(*QUOTE_COLUMNS).join(channels).where(where).order_by(quotes.c.id)
        ).all()
        return [to_quote(r) for r in rows]

    def _mark_trained_on(self, conn: Connection, gone: Sequence[Quote]) -> tuple[ChannelRef, ...]:
        """Mark each channel whose last training saw one of `gone`; returns those marked."""
        marked: list[ChannelRef] = []
        for ref in dict.fromkeys(ChannelRef(q.server, q.channel) for q in gone):
            row = self._channel_row(conn, ref)
            if row is None or row.last_trained_at is None:
                continue
            trained_on = [
                q
                for q in gone
                if (q.server, q.channel) == (ref.server, ref.channel)
                and q.added_at <= row.last_trained_at
            ]
            if trained_on:
                conn.execute(
                    sa.update(channels).where(channels.c.id == row.id).values(needs_retrain=True)
                )
                marked.append(ref)
                log.info(
                    "%s marked for retraining: %d trained-on quotes changed", ref, len(trained_on)
                )
        return tuple(marked)

    def _remove(self, where: sa.ColumnElement[bool]) -> RemoveResult:
        def work(conn: Connection) -> RemoveResult:
            gone = self._select(conn, where)
            if not gone:
                return RemoveResult(0)
            conn.execute(sa.delete(quotes).where(quotes.c.id.in_([q.id for q in gone])))
            return RemoveResult(len(gone), self._mark_trained_on(conn, gone))

        result = self._write(work, NOT_REMOVED)
        if result.removed:
            self._checkpoint()
        return result

    def _checkpoint(self) -> None:
        """SQLite: copy the log into the file and truncate it, so old row versions are gone."""
        if self.engine.dialect.name != "sqlite":
            return
        # On the driver's connection, outside any transaction: a checkpoint cannot run in one.
        try:
            with self.engine.connect() as conn:
                raw: Any = conn.connection.driver_connection
                busy, _, _ = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except (SQLAlchemyError, sqlite3.Error) as e:
            busy = 1
            log.debug("checkpoint failed: %s", e)
        if busy:
            # The removal is committed; the next checkpoint (any later removal) finishes this.
            log.warning("a reader kept the database log from being truncated after a removal")

    def delete_by_message(self, message_id: str | int) -> RemoveResult:
        """The Discord message was deleted: remove its quote, if one was saved."""
        return self._remove(quotes.c.message_id == str(message_id))

    def forget_member(self, server: str, author_id: str | int) -> RemoveResult:
        """Remove every quote by `author_id` in `server` (a member's `/quote forget`)."""
        channel_ids = sa.select(channels.c.id).where(channels.c.server == server)
        return self._remove(
            (quotes.c.author_id == str(author_id)) & quotes.c.channel_id.in_(channel_ids)
        )

    def forget_quote(self, quote_id: int, *, server: str | None = None) -> RemoveResult:
        """Remove one quote by id (only within `server` when given); unknown ids are an error.

        The error names no command: each front adds where its users find ids.
        """
        scope = f" in server {server}" if server is not None else ""
        if not 0 < quote_id <= MAX_ID:
            raise QuoteNotFound(f"there is no quote #{quote_id}{scope}")
        where = quotes.c.id == quote_id
        if server is not None:
            where = where & (channels.c.server == server)
        result = self._remove(where)
        if result.removed == 0:
            raise QuoteNotFound(f"there is no quote #{quote_id}{scope}")
        return result

    def edit_by_message(self, message_id: str | int, text: str) -> Quote | None:
        """The Discord message was edited: update its quote (None when none was saved).

        Edited to nothing, the quote is removed; edited into a copy of another quote in the
        channel, the two are merged (the other is kept).
        """
        body = clean(text)
        changed: list[bool] = []

        def work(conn: Connection) -> Quote | None:
            found = self._select(conn, quotes.c.message_id == str(message_id))
            if not found or body == found[0].text:
                return found[0] if found else None
            changed.append(True)
            return self._edit(conn, found[0], body)

        result = self._write(work, "the quote was not updated")
        if changed:
            self._checkpoint()
        return result

    def _edit(self, conn: Connection, old: Quote, body: str) -> Quote | None:
        self._mark_trained_on(conn, [old])
        if not normalize(body):
            conn.execute(sa.delete(quotes).where(quotes.c.id == old.id))
            return None
        body, _ = self._prepare(body)
        key = text_key(body)
        twin = self._select(
            conn,
            (
                quotes.c.channel_id
                == sa.select(quotes.c.channel_id).where(quotes.c.id == old.id).scalar_subquery()
            )
            & (quotes.c.text_key == key)
            & (quotes.c.id != old.id),
        )
        if twin:
            conn.execute(sa.delete(quotes).where(quotes.c.id == old.id))
            return twin[0]
        conn.execute(
            sa.update(quotes)
            .where(quotes.c.id == old.id)
            .values(text=body, text_key=key, edited_at=self.clock())
        )
        return self._select(conn, quotes.c.id == old.id)[0]
