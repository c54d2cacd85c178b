"""Streamed replies: show a model's answer in Discord while it is generated.

`StreamedReply` owns the messages of one answer. It edits them at most once per interval while
text arrives (Discord rate-limits edits), continues past 2,000 characters in follow-up messages
split at line or word boundaries, and sends everything with mentions disabled: model output can
never ping @everyone, a role or a user. It knows nothing about the engine or about commands; it
is handed the text so far and two callables that post the first and the next messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import discord

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000
NO_MENTIONS = discord.AllowedMentions.none()
CURSOR = " \N{HORIZONTAL ELLIPSIS}"
EMPTY = "\N{HORIZONTAL ELLIPSIS}"
# Room kept free in a message while it streams, so the cursor never pushes it past the limit.
_STREAM_RESERVE = len(CURSOR)


class EditableMessage(Protocol):
    """What a posted message must offer: `discord.Message`, `InteractionMessage`, ..."""

    @property
    def id(self) -> int: ...

    @property
    def edit(self) -> Callable[..., Awaitable[Any]]: ...


PostFirst = Callable[[str, discord.ui.View | None], Awaitable[EditableMessage]]
PostMore = Callable[[str], Awaitable[EditableMessage]]
Clock = Callable[[], float]


def split_point(text: str, limit: int = MESSAGE_LIMIT) -> int:
    """Where to cut `text` so the head fits in `limit`: the last newline, else space, else hard."""
    if len(text) <= limit:
        return len(text)
    window = text[: limit + 1]  # a separator right at the limit may be dropped, so look at it
    for separator in ("\n", " "):
        index = window.rfind(separator)
        if index > 0 and text[:index].strip():
            return index
    return limit


def _cut(text: str, limit: int) -> tuple[str, str]:
    """Split off a head of at most `limit` characters; the separator at the cut is dropped."""
    index = split_point(text, limit)
    head, rest = text[:index], text[index:]
    if rest[:1] in ("\n", " "):
        rest = rest[1:]
    return head, rest


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split text into Discord-sized parts at line or word boundaries (else a hard cut)."""
    parts: list[str] = []
    while len(text) > limit:
        head, text = _cut(text, limit)
        parts.append(head)
    parts.append(text)
    return parts


def _visible(content: str) -> str:
    return content if content.strip() else EMPTY


class StreamedReply:
    """The messages of one streamed answer: throttled edits, splitting, no mentions."""

    def __init__(
        self,
        post_first: PostFirst,
        post_more: PostMore,
        *,
        interval: float = 1.0,
        clock: Clock = time.monotonic,
        limit: int = MESSAGE_LIMIT,
        view: discord.ui.View | None = None,
    ) -> None:
        self._post_first = post_first
        self._post_more = post_more
        self.interval = interval
        self.clock = clock
        self.limit = limit
        self.view = view
        self.messages: list[EditableMessage] = []
        self.shown: list[str] = []
        self.edits = 0
        self.text = ""
        self._sealed = 0  # characters of `text` already placed in finished messages
        self._view_shown = False
        self._last_render: float | None = None

    @property
    def started(self) -> bool:
        """True once any answer text has been shown."""
        return bool(self.text)

    async def status(self, content: str) -> None:
        """Show a status line (queue place, "thinking") in the first message before any text."""
        if not self.started:
            await self._put(0, content, view=self.view)

    async def update(self, text: str) -> None:
        """Record the text so far; re-render only if the interval has passed since the last one."""
        self.text = text
        now = self.clock()
        if self._last_render is not None and now - self._last_render < self.interval:
            return
        self._last_render = now
        await self._render(final=False)

    async def finish(self, text: str, footer: str = "") -> None:
        """Show the full answer (plus an optional footer line) and remove the buttons."""
        self.text = text
        self.view = None
        await self._render(final=True, footer=footer)

    async def _render(self, *, final: bool, footer: str = "") -> None:
        limit = self.limit if final else self.limit - _STREAM_RESERVE
        rest = self.text[self._sealed :]
        index = len(self.messages) - 1 if self.messages else 0
        while len(rest) > limit:
            head, tail = _cut(rest, limit)
            await self._put(index, head, view=self.view if index == 0 else None)
            self._sealed += len(rest) - len(tail)
            rest = tail
            index += 1
        if final:
            if footer and len(rest) + 1 + len(footer) > self.limit:
                await self._put(index, rest, view=None)
                rest, index = "", index + 1
            content = f"{rest}\n{footer}" if footer and rest.strip() else (rest or footer)
        else:
            content = rest + CURSOR
        await self._put(index, content, view=self.view if index == 0 else None)
        if final and self._view_shown and self.messages:
            await self._edit(0, self.shown[0], view=None)

    async def _put(self, index: int, content: str, *, view: discord.ui.View | None) -> None:
        content = _visible(content)
        if index < len(self.messages):
            wants_view = view is not None
            if self.shown[index] != content or (index == 0 and wants_view != self._view_shown):
                await self._edit(index, content, view=view)
            return
        if index == 0:
            message = await self._post_first(content, view)
            self._view_shown = view is not None
        else:
            message = await self._post_more(content)
        self.messages.append(message)
        self.shown.append(content)

    async def _edit(self, index: int, content: str, *, view: discord.ui.View | None) -> None:
        fields: dict[str, Any] = {"content": content, "allowed_mentions": NO_MENTIONS}
        if index == 0:
            fields["view"] = view
            self._view_shown = view is not None
        await self.messages[index].edit(**fields)
        self.shown[index] = content
        self.edits += 1
