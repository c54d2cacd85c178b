"""Consent: quotes leave the store (deleted messages, `/quote forget`) or change (edited messages).

Consent reaches the weights through `channels.needs_retrain`. Until training runs are recorded,
each channel keeps the time of its last training (`mark_trained`); removing or editing a quote that
was added at or before that time marks the channel for retraining, so the next nightly run trains
it again without the quote. A channel never trained is never marked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from core.errors import QuoteNotFound
from core.store.base import QUOTE_COLUMNS, StoreBase, to_quote
from core.store.records import ChannelRef, Quote, RemoveResult, clean, text_key
from core.store.schema import channels, quotes

log = logging.getLogger(__name__)


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
        with self.engine.begin() as conn:
            gone = self._select(conn, where)
            if not gone:
                return RemoveResult(0)
            conn.execute(sa.delete(quotes).where(quotes.c.id.in_([q.id for q in gone])))
            marked = self._mark_trained_on(conn, gone)
        return RemoveResult(len(gone), marked)

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
        """Remove one quote by id (only within `server` when given); unknown ids are an error."""
        where = quotes.c.id == quote_id
        if server is not None:
            where = where & (channels.c.server == server)
        result = self._remove(where)
        if result.removed == 0:
            scope = f" in server {server}" if server is not None else ""
            raise QuoteNotFound(f"there is no quote #{quote_id}{scope}; `/quote list` shows ids")
        return result

    def edit_by_message(self, message_id: str | int, text: str) -> Quote | None:
        """The Discord message was edited: update its quote (None when none was saved).

        Edited to nothing, the quote is removed; edited into a copy of another quote in the
        channel, the two are merged (the other is kept).
        """
        body = clean(text)
        with self.engine.begin() as conn:
            found = self._select(conn, quotes.c.message_id == str(message_id))
            if not found:
                return None
            old = found[0]
            if body == old.text:
                return old
            self._mark_trained_on(conn, [old])
            if not body:
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
