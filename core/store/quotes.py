"""The quote store: saving quotes (merging duplicates), listing, and training data.

`QuoteStore` is the public class; its parts live beside it: `base.py` (database, channel flags),
`removal.py` (consent: deletes, edits, forget), `imports.py` (imports in batches), `bindings.py`
(which adapter answers in each channel). Every public method is one transaction, or (imports)
batches published by one transaction. Synchronous: from the event loop, use `AsyncQuoteStore`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from random import Random
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from core.errors import CollectionDisabled, QuoteCapReached
from core.store import dataset
from core.store.base import QUOTE_COLUMNS, to_quote
from core.store.bindings import BindingsMixin
from core.store.imports import QuoteImport
from core.store.records import SOURCES, ChannelRef, NewQuote, Quote, SaveResult, text_key
from core.store.schema import channels, quotes
from core.store.training import TrainingMixin

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

_CLASH_RETRIES = 3
NOT_SAVED = "the quote was NOT saved"


class QuoteStore(TrainingMixin, BindingsMixin, QuoteImport):
    """Quotes, channel flags and adapter bindings in one database (a SQLite file or
    PostgreSQL)."""

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

        def work(conn: Connection) -> SaveResult:
            return self._add_in(conn, ref, item, source, added_by, operator, notices)

        for _ in range(_CLASH_RETRIES):
            try:
                return self._write(work, NOT_SAVED, IntegrityError)
            except IntegrityError:
                # Another writer committed a row this save clashed with (on PostgreSQL two saves
                # of one message can race): the whole save runs again and now sees that row.
                log.debug("save in %s clashed with a concurrent one; again", ref, exc_info=True)
        return self._write(work, NOT_SAVED)

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
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        where = self._channel_where(ref)
        if author_id is not None:
            where = where & (quotes.c.author_id == str(author_id))
        query = sa.select(*QUOTE_COLUMNS).join(channels).where(where).order_by(quotes.c.id)
        rows = self._read(lambda conn: conn.execute(query.limit(limit).offset(offset)).all())
        return [to_quote(r) for r in rows]

    def count(self, ref: ChannelRef) -> int:
        """How many quotes the channel has."""
        query = sa.select(sa.func.count()).select_from(quotes.join(channels))
        query = query.where(self._channel_where(ref))
        return int(self._read(lambda conn: conn.execute(query).scalar_one()))

    def get(self, quote_id: int) -> Quote | None:
        """One quote by id."""
        found = self._read(lambda conn: self._select(conn, quotes.c.id == quote_id))
        return found[0] if found else None

    def by_message(self, message_id: str | int) -> Quote | None:
        """The quote saved from a Discord message, if any."""
        where = quotes.c.message_id == str(message_id)
        found = self._read(lambda conn: self._select(conn, where))
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
        where = quotes.c.author_id == str(author_id)
        return self._read(lambda conn: self._select(conn, where))

    def new_since(self, ref: ChannelRef, since: datetime | None) -> list[Quote]:
        """The channel's quotes added after `since` (all of them for None), oldest first."""
        where = self._channel_where(ref)
        if since is not None:
            where = where & (quotes.c.added_at > since)
        return self._read(lambda conn: self._select(conn, where))

    def to_dataset(
        self, ref: ChannelRef, split: Literal["train", "eval"] | None = None
    ) -> datasets.Dataset:
        """The channel's quotes as a `datasets.Dataset` (`quote`, `author`), untokenized.

        `split` keeps only the train or eval quotes; a quote's split depends on its text alone.
        """
        return dataset.to_dataset(self.list_quotes(ref), self.eval_percent, split)

    def training_data(self, ref: ChannelRef) -> tuple[list[Quote], list[Quote]]:
        """The channel's (train, eval) quotes from one read, split as `to_dataset` splits them
        (`dataset.split_of`), so a quote added meanwhile is in neither rather than in one.

        Plain records, not `datasets.Dataset`s: the trainer child gets them as JSON, and the
        bot need not load pyarrow and pandas for that.
        """
        chosen = self.list_quotes(ref)
        split = {q.id: dataset.split_of(q.text, self.eval_percent) for q in chosen}
        return (
            [q for q in chosen if split[q.id] == "train"],
            [q for q in chosen if split[q.id] == "eval"],
        )
