"""What the store hands out: plain, frozen records, and the text rules quotes follow.

Records are detached from the database (no lazy loading, safe to pass between threads and to
the event loop). `normalize` and `text_key` define when two quotes are the same quote.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple

from core.names import CONSOLE_SERVER, channel_name

QuoteSource = Literal["reaction", "menu", "command", "import"]
SOURCES: tuple[str, ...] = ("reaction", "menu", "command", "import")

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Text as compared for duplicates: NFKC, invisible format characters (zero-width spaces and
    joiners, direction marks) dropped, whitespace runs collapsed, trimmed, case-folded.

    Empty when the text has nothing visible: such a quote is refused.
    """
    folded = unicodedata.normalize("NFKC", text)
    visible = "".join(c for c in folded if unicodedata.category(c) != "Cf")
    return _SPACE.sub(" ", visible).strip().casefold()


def text_key(text: str) -> str:
    """A fixed-size key of the normalized text (indexes stay small for long quotes)."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def clean(text: str) -> str:
    """Text as stored: trimmed, line breaks kept, runs of spaces inside a line kept as written."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


@dataclass(frozen=True)
class ChannelRef:
    """A channel as the store keys it: (server, channel). Discord ids are kept as strings."""

    server: str
    channel: str

    @classmethod
    def console(cls, name: str) -> ChannelRef:
        """A channel of the local `console` server; `name` is checked (`core.names`)."""
        return cls(CONSOLE_SERVER, channel_name(name))

    @classmethod
    def discord(cls, guild_id: int | str, channel_id: int | str) -> ChannelRef:
        """A Discord channel (for a thread, pass its parent channel)."""
        return cls(str(guild_id), str(channel_id))

    def __str__(self) -> str:
        if self.server == CONSOLE_SERVER:
            return f"#{self.channel}"
        return f"channel {self.channel} (server {self.server})"


@dataclass(frozen=True)
class Quote:
    """One stored quote."""

    id: int
    server: str
    channel: str
    text: str
    author_id: str | None
    author_name: str | None
    source: str
    added_at: datetime
    added_by: str | None
    message_id: str | None
    tags: tuple[str, ...] = ()
    edited_at: datetime | None = None

    @property
    def author(self) -> str:
        """The name to show and to train with ('' when unknown)."""
        return self.author_name or ""

    def as_dict(self) -> dict[str, object]:
        """The CLI's JSON shape (`list --json`, `export`)."""
        return {
            "id": self.id,
            "text": self.text,
            "author": self.author_name,
            "author_id": self.author_id,
            "source": self.source,
            "added_at": self.added_at.isoformat(),
            "server": self.server,
            "channel": self.channel,
            "message_id": self.message_id,
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class ChannelState:
    """A channel's collection and training flags."""

    server: str
    channel: str
    collecting: bool
    auto_train: bool
    needs_retrain: bool
    last_trained_at: datetime | None
    train_adapter: str | None = None  # the adapter its trainings produce, once it has one


@dataclass(frozen=True)
class SaveResult:
    """What `add` did: the stored quote, whether it is new, and notices for the user."""

    quote: Quote
    created: bool
    notices: tuple[str, ...] = ()


@dataclass(frozen=True)
class NewQuote:
    """A quote to add (the import path builds many of these)."""

    text: str
    author_name: str | None = None
    author_id: str | None = None
    message_id: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImportReport:
    """How an import went: quotes added, duplicates merged, and notices (cut texts)."""

    added: int
    duplicates: int
    notices: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class RemoveResult:
    """What a removal did: how many quotes went, and whether the channel must retrain."""

    removed: int
    marked_for_retraining: tuple[ChannelRef, ...] = ()


BindingSource = Literal["channel", "server", "none"]


@dataclass(frozen=True)
class Binding:
    """Which adapter a channel is bound to, after resolution (`QuoteStore.binding`).

    `adapter` None is the base model (no adapter). `version` None follows the adapter's latest
    promoted version; `v3` pins one. `source` says where it came from: the channel's own row,
    its server's default, or neither (`none`: the base model, nothing set).
    """

    adapter: str | None
    version: str | None
    source: BindingSource


@dataclass(frozen=True)
class BoundChannel:
    """One stored binding: a channel's own, or its server's default (`channel` None)."""

    server: str
    channel: str | None
    adapter: str | None
    version: str | None
    updated_at: datetime
    updated_by: str | None

    @property
    def channel_ref(self) -> ChannelRef | None:
        """The channel it binds (None for the server's default)."""
        return None if self.channel is None else ChannelRef(self.server, self.channel)

    @property
    def binding(self) -> Binding:
        """The row as a `Binding` (source `channel` or `server`)."""
        return Binding(self.adapter, self.version, "server" if self.channel is None else "channel")


class ServerDefault(NamedTuple):
    """A server's default binding (`adapter` None: explicitly the base model)."""

    server: str
    adapter: str | None
    version: str | None
