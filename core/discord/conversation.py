"""Conversations from reply chains: replying to one of the bot's answers continues it.

`AnswerIndex` remembers, for each message of a recent answer, the turns that led to it (so a
slash command's prompt, which no message shows, is part of the context). Past what it remembers
(after a restart, say), the chain is read from Discord: each referenced message is taken from
the cache or fetched, the bot's own messages become assistant turns, everyone else's user turns.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Sequence

import discord

from core.model.requests import ChatMessage

log = logging.getLogger(__name__)

_SMALL_PRINT = re.compile(r"^-# .*$|^\N{WARNING SIGN} .*$", re.MULTILINE)


class AnswerIndex:
    """A bounded memory: answer message id -> the conversation that message ends."""

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._turns: OrderedDict[int, tuple[ChatMessage, ...]] = OrderedDict()

    def remember(self, message_ids: Sequence[int], turns: Sequence[ChatMessage]) -> None:
        """Record that these messages show the last turn of `turns`."""
        for message_id in message_ids:
            self._turns[message_id] = tuple(turns)
            self._turns.move_to_end(message_id)
        while len(self._turns) > self.capacity:
            self._turns.popitem(last=False)

    def get(self, message_id: int) -> tuple[ChatMessage, ...] | None:
        return self._turns.get(message_id)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._turns


def message_text(message: discord.Message, me: discord.abc.User | None) -> str:
    """A message's text as a turn: without the bot's mention and the bot's own small print."""
    text = message.content
    if me is not None:
        text = re.sub(rf"<@!?{me.id}>", "", text)
        if message.author.id == me.id:
            text = _SMALL_PRINT.sub("", text)
    return text.strip()


async def referenced_message(message: discord.Message) -> discord.Message | None:
    """The message `message` replies to, from the payload, the cache or Discord; None if gone."""
    ref = message.reference
    if ref is None or ref.message_id is None:
        return None
    if isinstance(ref.resolved, discord.Message):
        return ref.resolved
    if ref.cached_message is not None:
        return ref.cached_message
    try:
        return await message.channel.fetch_message(ref.message_id)
    except (discord.NotFound, discord.Forbidden) as e:
        log.debug("reply chain ends at message %s: %s", ref.message_id, e)
        return None


async def reply_chain(
    message: discord.Message, me: discord.abc.User, index: AnswerIndex, limit: int
) -> list[ChatMessage]:
    """The conversation `message` continues, oldest first, at most `limit` turns, ending with it."""
    turns = [ChatMessage("user", message_text(message, me))]
    earlier = await referenced_message(message)
    while earlier is not None and len(turns) < limit:
        known = index.get(earlier.id)
        if known is not None:
            turns = [*known, *turns]
            break
        text = message_text(earlier, me)
        if text:
            mine = earlier.author.id == me.id
            turns.insert(0, ChatMessage("assistant" if mine else "user", text))
        earlier = await referenced_message(earlier)
    return turns[-limit:]
