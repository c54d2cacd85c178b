"""Collecting quotes from messages: star reactions, the "Save as quote" menu, and keeping saved
quotes in step with their messages (a deleted message removes its quote, an edit updates it).

A star removed later does not delete a saved quote. Reading a starred message's text needs the
message content intent (`discord.message_content_intent`); without it the save is skipped with
a log line. Messages written by bots (the bot's own answers included) are never saved.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from core.discord import LoracordBot, channel_key_of
from core.errors import QuoteError
from core.store import ChannelRef, SaveResult

log = logging.getLogger(__name__)

BOT_MESSAGE = "Messages written by bots are not saved as quotes."


def channel_ref(guild_id: int | None, channel: object) -> ChannelRef | None:
    """The store's key of a server channel (threads count as their parent)."""
    key = channel_key_of(guild_id, channel)
    return ChannelRef.discord(key.guild_id, key.channel_id) if key else None


def saved_text(result: SaveResult) -> str:
    """What the saver is told."""
    quote = result.quote
    head = (
        f"Saved as quote #{quote.id}." if result.created else f"Already saved as quote #{quote.id}."
    )
    return " ".join([head, *(n[0].upper() + n[1:] + "." for n in result.notices)])


class QuoteCollector(commands.Cog):
    """The message menu and the message listeners."""

    def __init__(self, bot: LoracordBot) -> None:
        self.bot = bot
        self.menu = app_commands.ContextMenu(name="Save as quote", callback=self.save_as_quote)
        self.menu.guild_only = True

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)

    async def _save(
        self, ref: ChannelRef, message: discord.Message, source: str, saver: int
    ) -> SaveResult:
        if message.author.bot:
            raise QuoteError(BOT_MESSAGE)
        return await self.bot.app.store.add(
            ref,
            message.content,
            source=source,
            author_id=str(message.author.id),
            author_name=message.author.display_name,
            added_by=str(saver),
            message_id=str(message.id),
        )

    async def save_as_quote(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        """The "Save as quote" message menu."""
        ref = channel_ref(interaction.guild_id, message.channel)
        if ref is None:
            raise QuoteError("Quotes are saved in server channels only.")
        result = await self._save(ref, message, "menu", interaction.user.id)
        await interaction.response.send_message(saved_text(result), ephemeral=True)

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        settings = self.bot.settings.quotes
        if str(payload.emoji) != settings.star_emoji or payload.guild_id is None:
            return
        channel = self.bot.get_channel(payload.channel_id)
        if not isinstance(channel, discord.abc.Messageable):
            return
        ref = channel_ref(payload.guild_id, channel)
        # A star anywhere is common; a fetch is an API call. Only channels that collect pay it.
        if ref is None or not (await self.bot.app.store.channel_state(ref)).collecting:
            return
        try:
            message = await channel.fetch_message(payload.message_id)
        except (discord.NotFound, discord.Forbidden) as e:
            # Deleted before we looked, or a channel the bot cannot read history in.
            log.info("starred message %s in %s not read: %s", payload.message_id, ref, e.text)
            return
        stars = next((r.count for r in message.reactions if str(r.emoji) == settings.star_emoji), 0)
        if stars < settings.star_threshold or message.author.bot:
            return
        try:
            result = await self._save(ref, message, "reaction", payload.user_id)
        except QuoteError as e:
            # Nobody to answer for a reaction: the refusal (collection off, cap) is only logged.
            log.info("star on message %s in %s not saved: %s", message.id, ref, e)
            return
        if result.created:
            log.info("message %s saved as quote #%s by a star", message.id, result.quote.id)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        result = await self.bot.app.store.delete_by_message(payload.message_id)
        if result.removed:
            log.info("message %s deleted: its quote is removed", payload.message_id)

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        for message_id in payload.message_ids:
            await self.bot.app.store.delete_by_message(message_id)

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        content = payload.data.get("content")
        # Without the content intent Discord sends edits with empty text: that is no edit.
        if content is None or not self.bot.settings.discord.message_content_intent:
            return
        if await self.bot.app.store.by_message(payload.message_id) is None:
            return
        await self.bot.app.store.edit_by_message(payload.message_id, content)
        log.info("message %s edited: its quote follows", payload.message_id)
