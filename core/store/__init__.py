"""The database: quotes, channel flags, adapter bindings, the schema's migrations, and training
data.

Public names: `QuoteStore` (synchronous, for the CLI and worker threads), `AsyncQuoteStore`
(the same calls off the event loop), the records they return, and `open_store(settings)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.store.aio import AsyncQuoteStore
from core.store.dataset import split_of
from core.store.quotes import QuoteStore
from core.store.records import (
    CONSOLE_SERVER,
    SOURCES,
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
    normalize,
)
from core.store.training import LockHolder, TrainingRun

if TYPE_CHECKING:
    from core.settings import Settings


def open_store(settings: Settings) -> QuoteStore:
    """The settings' store, opened (schema upgraded to the newest revision)."""
    return QuoteStore.from_settings(settings).open()


__all__ = [
    "CONSOLE_SERVER",
    "SOURCES",
    "AsyncQuoteStore",
    "Binding",
    "BoundChannel",
    "ChannelRef",
    "ChannelState",
    "ImportReport",
    "LockHolder",
    "NewQuote",
    "Quote",
    "QuoteStore",
    "RemoveResult",
    "SaveResult",
    "ServerDefault",
    "TrainingRun",
    "normalize",
    "open_store",
    "split_of",
]
