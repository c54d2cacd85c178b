"""The store for the event loop: the same calls, each run in a worker thread.

Discord plugins and the console use this; SQLAlchemy stays synchronous underneath (APScheduler's
job store shares the database), and the event loop never waits on the database. Calls run on the
store's own small thread pool, not asyncio's default one: a writer waiting out a locked database
then never holds the threads the console, the model or other `to_thread` users need.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from core.store.quotes import QuoteStore
from core.store.records import (
    Binding,
    BoundChannel,
    ChannelRef,
    ChannelState,
    ImportReport,
    NewQuote,
    Quote,
    RemoveResult,
    SaveResult,
    ServerDefault,
)
from core.store.training import LockHolder, TrainingRun

if TYPE_CHECKING:
    import datasets

T = TypeVar("T")
WORKERS = 2


class AsyncQuoteStore:
    """Awaitable twin of `QuoteStore`; `sync` is the store underneath."""

    def __init__(self, store: QuoteStore, workers: int = WORKERS) -> None:
        self.sync = store
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="loracord-store")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def open(self) -> AsyncQuoteStore:
        """Connect and upgrade the schema."""
        await self._call(self.sync.open)
        return self

    async def close(self) -> None:
        """Release every connection and the store's threads."""
        try:
            await self._call(self.sync.close)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None

    async def add(self, ref: ChannelRef, text: str, **kwargs: Any) -> SaveResult:
        """See `QuoteStore.add`."""
        return await self._call(self.sync.add, ref, text, **kwargs)

    async def import_quotes(
        self, ref: ChannelRef, items: Iterable[NewQuote], *, added_by: str | None = None
    ) -> ImportReport:
        """See `QuoteStore.import_quotes`."""
        return await self._call(self.sync.import_quotes, ref, list(items), added_by=added_by)

    async def list_quotes(self, ref: ChannelRef, **kwargs: Any) -> list[Quote]:
        """See `QuoteStore.list_quotes`."""
        return await self._call(self.sync.list_quotes, ref, **kwargs)

    async def count(self, ref: ChannelRef) -> int:
        """See `QuoteStore.count`."""
        return await self._call(self.sync.count, ref)

    async def get(self, quote_id: int) -> Quote | None:
        """See `QuoteStore.get`."""
        return await self._call(self.sync.get, quote_id)

    async def by_message(self, message_id: str | int) -> Quote | None:
        """See `QuoteStore.by_message`."""
        return await self._call(self.sync.by_message, message_id)

    async def random(self, ref: ChannelRef) -> Quote | None:
        """See `QuoteStore.random`."""
        return await self._call(self.sync.random, ref)

    async def delete_by_message(self, message_id: str | int) -> RemoveResult:
        """See `QuoteStore.delete_by_message`."""
        return await self._call(self.sync.delete_by_message, message_id)

    async def edit_by_message(self, message_id: str | int, text: str) -> Quote | None:
        """See `QuoteStore.edit_by_message`."""
        return await self._call(self.sync.edit_by_message, message_id, text)

    async def forget_member(self, server: str, author_id: str | int) -> RemoveResult:
        """See `QuoteStore.forget_member`."""
        return await self._call(self.sync.forget_member, server, author_id)

    async def forget_quote(self, quote_id: int, *, server: str | None = None) -> RemoveResult:
        """See `QuoteStore.forget_quote`."""
        return await self._call(self.sync.forget_quote, quote_id, server=server)

    async def export_member(self, author_id: str | int) -> list[Quote]:
        """See `QuoteStore.export_member`."""
        return await self._call(self.sync.export_member, author_id)

    async def channel_state(self, ref: ChannelRef) -> ChannelState:
        """See `QuoteStore.channel_state`."""
        return await self._call(self.sync.channel_state, ref)

    async def set_collecting(self, ref: ChannelRef, on: bool) -> ChannelState:
        """See `QuoteStore.set_collecting`."""
        return await self._call(self.sync.set_collecting, ref, on)

    async def set_auto_train(self, ref: ChannelRef, on: bool) -> ChannelState:
        """See `QuoteStore.set_auto_train`."""
        return await self._call(self.sync.set_auto_train, ref, on)

    async def mark_trained(self, ref: ChannelRef, at: datetime) -> ChannelState:
        """See `QuoteStore.mark_trained`."""
        return await self._call(self.sync.mark_trained, ref, at)

    async def new_since(self, ref: ChannelRef, since: datetime | None) -> list[Quote]:
        """See `QuoteStore.new_since`."""
        return await self._call(self.sync.new_since, ref, since)

    async def to_dataset(self, ref: ChannelRef, split: Any = None) -> datasets.Dataset:
        """See `QuoteStore.to_dataset`."""
        return await self._call(self.sync.to_dataset, ref, split)

    async def mark_retrain(self, ref: ChannelRef, on: bool = True) -> ChannelState:
        """See `QuoteStore.mark_retrain`."""
        return await self._call(self.sync.mark_retrain, ref, on)

    async def bind(
        self,
        ref: ChannelRef,
        adapter: str | None,
        version: str | None = None,
        *,
        by: str | None = None,
    ) -> Binding:
        """See `QuoteStore.bind`."""
        return await self._call(self.sync.bind, ref, adapter, version, by=by)

    async def unbind(self, ref: ChannelRef) -> None:
        """See `QuoteStore.unbind`."""
        await self._call(self.sync.unbind, ref)

    async def set_server_default(
        self,
        server: str,
        adapter: str | None,
        version: str | None = None,
        *,
        by: str | None = None,
    ) -> Binding:
        """See `QuoteStore.set_server_default`."""
        return await self._call(self.sync.set_server_default, server, adapter, version, by=by)

    async def clear_server_default(self, server: str) -> None:
        """See `QuoteStore.clear_server_default`."""
        await self._call(self.sync.clear_server_default, server)

    async def binding(self, ref: ChannelRef) -> Binding:
        """See `QuoteStore.binding`."""
        return await self._call(self.sync.binding, ref)

    async def bindings(self, server: str | None = None) -> list[BoundChannel]:
        """See `QuoteStore.bindings`."""
        return await self._call(self.sync.bindings, server)

    async def server_defaults(self, server: str | None = None) -> list[ServerDefault]:
        """See `QuoteStore.server_defaults`."""
        return await self._call(self.sync.server_defaults, server)

    async def channels_using(self, adapter: str) -> list[ChannelRef]:
        """See `QuoteStore.channels_using`."""
        return await self._call(self.sync.channels_using, adapter)

    async def servers_defaulting_to(self, adapter: str) -> list[str]:
        """See `QuoteStore.servers_defaulting_to`."""
        return await self._call(self.sync.servers_defaulting_to, adapter)

    async def bindings_stamp(self) -> tuple[int, str]:
        """See `QuoteStore.bindings_stamp`."""
        return await self._call(self.sync.bindings_stamp)

    # -- training --------------------------------------------------------------------------

    async def training_data(self, ref: ChannelRef) -> tuple[list[Quote], list[Quote]]:
        """See `QuoteStore.training_data`."""
        return await self._call(self.sync.training_data, ref)

    async def acquire_training_lock(
        self, holder: str, lease_seconds: float, channel: ChannelRef | None = None
    ) -> LockHolder | None:
        """See `QuoteStore.acquire_training_lock`."""
        return await self._call(self.sync.acquire_training_lock, holder, lease_seconds, channel)

    async def renew_training_lock(self, holder: str, lease_seconds: float) -> bool:
        """See `QuoteStore.renew_training_lock`."""
        return await self._call(self.sync.renew_training_lock, holder, lease_seconds)

    async def release_training_lock(self, holder: str) -> None:
        """See `QuoteStore.release_training_lock`."""
        await self._call(self.sync.release_training_lock, holder)

    async def training_lock_holder(self) -> LockHolder | None:
        """See `QuoteStore.training_lock_holder`."""
        return await self._call(self.sync.training_lock_holder)

    async def start_run(self, channel: ChannelRef, **kwargs: Any) -> TrainingRun:
        """See `QuoteStore.start_run`."""
        return await self._call(self.sync.start_run, channel, **kwargs)

    async def update_run(self, run_id: int, **values: Any) -> TrainingRun:
        """See `QuoteStore.update_run`."""
        return await self._call(self.sync.update_run, run_id, **values)

    async def runs(self, channel: ChannelRef | None = None, **kwargs: Any) -> list[TrainingRun]:
        """See `QuoteStore.runs`."""
        return await self._call(self.sync.runs, channel, **kwargs)

    async def set_train_adapter(self, ref: ChannelRef, name: str) -> ChannelState:
        """See `QuoteStore.set_train_adapter`."""
        return await self._call(self.sync.set_train_adapter, ref, name)

    async def channels_training(self, adapter: str) -> list[ChannelRef]:
        """See `QuoteStore.channels_training`."""
        return await self._call(self.sync.channels_training, adapter)

    async def auto_train_channels(self) -> list[tuple[ChannelState, int]]:
        """See `QuoteStore.auto_train_channels`."""
        return await self._call(self.sync.auto_train_channels)

    async def unchanged_quote_ids(self, ids: Sequence[int], since: datetime) -> set[int]:
        """See `QuoteStore.unchanged_quote_ids`."""
        return await self._call(self.sync.unchanged_quote_ids, ids, since)
