"""The store for the event loop: the same calls, each run in a worker thread.

Discord plugins and the console use this; SQLAlchemy stays synchronous underneath (APScheduler's
job store shares the database), and the event loop never waits on the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from core.store.quotes import QuoteStore
from core.store.records import (
    ChannelRef,
    ChannelState,
    ImportReport,
    NewQuote,
    Quote,
    RemoveResult,
    SaveResult,
)

if TYPE_CHECKING:
    import datasets


class AsyncQuoteStore:
    """Awaitable twin of `QuoteStore`; `sync` is the store underneath."""

    def __init__(self, store: QuoteStore) -> None:
        self.sync = store

    async def open(self) -> AsyncQuoteStore:
        """Connect and upgrade the schema."""
        await asyncio.to_thread(self.sync.open)
        return self

    async def close(self) -> None:
        """Release every connection."""
        await asyncio.to_thread(self.sync.close)

    async def add(self, ref: ChannelRef, text: str, **kwargs: Any) -> SaveResult:
        """See `QuoteStore.add`."""
        return await asyncio.to_thread(self.sync.add, ref, text, **kwargs)

    async def import_quotes(
        self, ref: ChannelRef, items: Iterable[NewQuote], *, added_by: str | None = None
    ) -> ImportReport:
        """See `QuoteStore.import_quotes`."""
        return await asyncio.to_thread(self.sync.import_quotes, ref, list(items), added_by=added_by)

    async def list_quotes(self, ref: ChannelRef, **kwargs: Any) -> list[Quote]:
        """See `QuoteStore.list_quotes`."""
        return await asyncio.to_thread(self.sync.list_quotes, ref, **kwargs)

    async def count(self, ref: ChannelRef) -> int:
        """See `QuoteStore.count`."""
        return await asyncio.to_thread(self.sync.count, ref)

    async def get(self, quote_id: int) -> Quote | None:
        """See `QuoteStore.get`."""
        return await asyncio.to_thread(self.sync.get, quote_id)

    async def by_message(self, message_id: str | int) -> Quote | None:
        """See `QuoteStore.by_message`."""
        return await asyncio.to_thread(self.sync.by_message, message_id)

    async def random(self, ref: ChannelRef) -> Quote | None:
        """See `QuoteStore.random`."""
        return await asyncio.to_thread(self.sync.random, ref)

    async def delete_by_message(self, message_id: str | int) -> RemoveResult:
        """See `QuoteStore.delete_by_message`."""
        return await asyncio.to_thread(self.sync.delete_by_message, message_id)

    async def edit_by_message(self, message_id: str | int, text: str) -> Quote | None:
        """See `QuoteStore.edit_by_message`."""
        return await asyncio.to_thread(self.sync.edit_by_message, message_id, text)

    async def forget_member(self, server: str, author_id: str | int) -> RemoveResult:
        """See `QuoteStore.forget_member`."""
        return await asyncio.to_thread(self.sync.forget_member, server, author_id)

    async def forget_quote(self, quote_id: int, *, server: str | None = None) -> RemoveResult:
        """See `QuoteStore.forget_quote`."""
        return await asyncio.to_thread(self.sync.forget_quote, quote_id, server=server)

    async def export_member(self, author_id: str | int) -> list[Quote]:
        """See `QuoteStore.export_member`."""
        return await asyncio.to_thread(self.sync.export_member, author_id)

    async def channel_state(self, ref: ChannelRef) -> ChannelState:
        """See `QuoteStore.channel_state`."""
        return await asyncio.to_thread(self.sync.channel_state, ref)

    async def set_collecting(self, ref: ChannelRef, on: bool) -> ChannelState:
        """See `QuoteStore.set_collecting`."""
        return await asyncio.to_thread(self.sync.set_collecting, ref, on)

    async def set_auto_train(self, ref: ChannelRef, on: bool) -> ChannelState:
        """See `QuoteStore.set_auto_train`."""
        return await asyncio.to_thread(self.sync.set_auto_train, ref, on)

    async def mark_trained(self, ref: ChannelRef, at: datetime) -> ChannelState:
        """See `QuoteStore.mark_trained`."""
        return await asyncio.to_thread(self.sync.mark_trained, ref, at)

    async def new_since(self, ref: ChannelRef, since: datetime | None) -> list[Quote]:
        """See `QuoteStore.new_since`."""
        return await asyncio.to_thread(self.sync.new_since, ref, since)

    async def to_dataset(self, ref: ChannelRef, split: Any = None) -> datasets.Dataset:
        """See `QuoteStore.to_dataset`."""
        return await asyncio.to_thread(self.sync.to_dataset, ref, split)
