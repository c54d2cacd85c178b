"""The quote store: saving quotes (merging duplicates), imports, listing, and training data.

`QuoteStore` is the public class; its parts live beside it: `base.py` (database, channel flags),
`removal.py` (consent: deletes, edits, forget). Every public method is one transaction.
Synchronous: from the event loop, use `AsyncQuoteStore`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from random import Random
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from core.errors import CollectionDisabled, QuoteCapReached
from core.store import dataset
from core.store.base import QUOTE_COLUMNS, to_quote
from core.store.records import (
    SOURCES,
    ChannelRef,
    ImportReport,
    NewQuote,
    Quote,
    SaveResult,
    text_key,
)
from core.store.removal import QuoteRemoval
from core.store.schema import channels, quotes

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


class QuoteStore(QuoteRemoval):
    """Quotes and channel flags in one database (a SQLite file or PostgreSQL)."""

    def _existing(
        self, conn: Connection, channel_id: int, key: str, message_id: str | None
    ) -> Quote | None:
        match = (quotes.c.channel_id == channel_id) & (quotes.c.text_key == key)
        if message_id is not None:
            match = match | (quotes.c.message_id == message_id)
        row = conn.execute(
            sa.select(*QUOTE_COLUMNS).join(channels).where(match).order_by(quotes.c.id)
        ).first()
        return to_quote(row) if row else None

    def _check_cap(self, conn: Connection, channel_id: int, added_by: str) -> None:
        since = self.clock() - timedelta(days=1)
        count = conn.execute(
            sa.select(sa.func.count()).where(
                (quotes.c.channel_id == channel_id)
                & (quotes.c.added_by == added_by)
                & (quotes.c.added_at > since)
            )
        ).scalar_one()
        if count >= self.daily_cap:
            raise QuoteCapReached(
                f"you have saved {count} quotes in this channel in the last 24 hours, the most "
                "allowed (quotes.daily_cap); try again tomorrow"
            )

    def _insert(
        self, conn: Connection, channel_id: int, item: NewQuote, source: str, added_by: str | None
    ) -> Quote:
        values = {
            "channel_id": channel_id,
            "message_id": item.message_id,
            "author_id": item.author_id,
            "author_name": (item.author_name or None) and item.author_name[:200],
            "text": item.text,
            "text_key": text_key(item.text),
            "source": source,
            "added_at": self.clock(),
            "added_by": added_by,
            "tags": json.dumps(list(item.tags), ensure_ascii=False) if item.tags else "",
        }
        quote_id = conn.execute(
            sa.insert(quotes).values(values).returning(quotes.c.id)
        ).scalar_one()
        row = conn.execute(
            sa.select(*QUOTE_COLUMNS).join(channels).where(quotes.c.id == quote_id)
        ).one()
        return to_quote(row)

    def add(
        self,
        ref: ChannelRef,
        text: str,
        *,
        source: str,
        author_id: str | None = None,
        author_name: str | None = None,
        added_by: str | None = None,
        message_id: str | None = None,
        tags: Sequence[str] = (),
        operator: bool = False,
    ) -> SaveResult:
        """Save one quote; a duplicate (same message, or same text in the channel) is merged.

        `operator=True` (the CLI, admins' imports) skips the channel switch and the daily cap.
        """
        if source not in SOURCES:
            raise ValueError(f"unknown quote source {source!r}")
        body, notices = self._prepare(text)
        item = NewQuote(body, author_name, author_id, message_id, tuple(tags))
        try:
            with self.engine.begin() as conn:
                return self._add_in(conn, ref, item, source, added_by, operator, notices)
        except IntegrityError:
            # Two saves of the same quote raced (two stars at once): the other one won.
            log.debug("concurrent save of the same quote in %s; merging", ref, exc_info=True)
            with self.engine.begin() as conn:
                channel_id = self._channel_id(conn, ref)
                existing = self._existing(conn, channel_id, text_key(body), message_id)
            if existing is None:
                raise
            return SaveResult(existing, False, notices)

    def _add_in(
        self,
        conn: Connection,
        ref: ChannelRef,
        item: NewQuote,
        source: str,
        added_by: str | None,
        operator: bool,
        notices: tuple[str, ...],
    ) -> SaveResult:
        channel_id = self._channel_id(conn, ref)
        if not operator:
            collecting = conn.execute(
                sa.select(channels.c.collecting).where(channels.c.id == channel_id)
            ).scalar_one()
            if not collecting:
                raise CollectionDisabled(
                    f"quote collection is off in {ref}; an admin can turn it on with /quote enable"
                )
        existing = self._existing(conn, channel_id, text_key(item.text), item.message_id)
        if existing is not None:
            return SaveResult(existing, False, notices)
        if not operator and added_by is not None:
            self._check_cap(conn, channel_id, added_by)
        return SaveResult(self._insert(conn, channel_id, item, source, added_by), True, notices)

    def import_quotes(
        self, ref: ChannelRef, items: Iterable[NewQuote], *, added_by: str | None = None
    ) -> ImportReport:
        """Add many quotes in one transaction (all or nothing); duplicates are counted, not added.

        An item with empty text fails the whole import: parse files with `core.quotes_import`,
        which names the line.
        """
        added = duplicates = 0
        notices: list[str] = []
        with self.engine.begin() as conn:
            channel_id = self._channel_id(conn, ref)
            for n, item in enumerate(items, 1):
                body, cut = self._prepare(item.text)
                notices.extend(f"quote {n}: {c}" for c in cut)
                prepared = NewQuote(body, item.author_name, item.author_id, None, item.tags)
                if self._existing(conn, channel_id, text_key(body), None) is not None:
                    duplicates += 1
                    continue
                self._insert(conn, channel_id, prepared, "import", added_by)
                added += 1
        log.info("imported %d quotes into %s (%d duplicates)", added, ref, duplicates)
        return ImportReport(added, duplicates, tuple(notices))

    def _channel_where(self, ref: ChannelRef) -> sa.ColumnElement[bool]:
        return (channels.c.server == ref.server) & (channels.c.channel == ref.channel)

    def list_quotes(
        self,
        ref: ChannelRef,
        *,
        author_id: str | int | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Quote]:
        """The channel's quotes, oldest first (one member's when `author_id` is given)."""
        where = self._channel_where(ref)
        if author_id is not None:
            where = where & (quotes.c.author_id == str(author_id))
        query = sa.select(*QUOTE_COLUMNS).join(channels).where(where).order_by(quotes.c.id)
        with self.engine.connect() as conn:
            rows = conn.execute(query.limit(limit).offset(offset)).all()
        return [to_quote(r) for r in rows]

    def count(self, ref: ChannelRef) -> int:
        """How many quotes the channel has."""
        query = sa.select(sa.func.count()).select_from(quotes.join(channels))
        with self.engine.connect() as conn:
            return int(conn.execute(query.where(self._channel_where(ref))).scalar_one())

    def get(self, quote_id: int) -> Quote | None:
        """One quote by id."""
        with self.engine.connect() as conn:
            found = self._select(conn, quotes.c.id == quote_id)
        return found[0] if found else None

    def by_message(self, message_id: str | int) -> Quote | None:
        """The quote saved from a Discord message, if any."""
        with self.engine.connect() as conn:
            found = self._select(conn, quotes.c.message_id == str(message_id))
        return found[0] if found else None

    def random(self, ref: ChannelRef, rng: Random | None = None) -> Quote | None:
        """A random quote of the channel (None when it has none)."""
        total = self.count(ref)
        if total == 0:
            return None
        pick = (rng or Random()).randrange(total)
        found = self.list_quotes(ref, limit=1, offset=pick)
        return found[0] if found else None

    def export_member(self, author_id: str | int) -> list[Quote]:
        """Every quote by one member, in every server and channel (for `quotes export`)."""
        with self.engine.connect() as conn:
            return self._select(conn, quotes.c.author_id == str(author_id))

    def new_since(self, ref: ChannelRef, since: datetime | None) -> list[Quote]:
        """The channel's quotes added after `since` (all of them for None), oldest first."""
        where = self._channel_where(ref)
        if since is not None:
            where = where & (quotes.c.added_at > since)
        with self.engine.connect() as conn:
            return self._select(conn, where)

    def to_dataset(
        self, ref: ChannelRef, split: Literal["train", "eval"] | None = None
    ) -> datasets.Dataset:
        """The channel's quotes as a `datasets.Dataset` (`quote`, `author`), untokenized.

        `split` keeps only the train or eval quotes; a quote's split depends on its text alone.
        """
        return dataset.to_dataset(self.list_quotes(ref), self.eval_percent, split)
