"""`/quote`: add, list, random, forget (members), enable, disable, import (admins).

Every answer but `/quote random` is ephemeral. Refusals from the store (collection off, the
daily cap, empty text, a malformed import) reach the user through the host's error handler.
"""

from __future__ import annotations

import asyncio
import logging

import discord
from discord import app_commands
from discord.ext import commands

from core.discord import NO_MENTIONS, LoracordBot, NotAdmin, admin_only, is_admin
from core.errors import QuoteError, QuoteNotFound
from core.quotes_import import parse
from core.store import ChannelRef, Quote, RemoveResult

from .collect import channel_ref, saved_text

log = logging.getLogger(__name__)

LIST_LIMIT = 15
IMPORT_MAX_BYTES = 8 * 1024 * 1024


def _ref(interaction: discord.Interaction) -> ChannelRef:
    ref = channel_ref(interaction.guild_id, interaction.channel)
    if ref is None:
        raise QuoteError("Quotes live in server channels; use this command in one.")
    return ref


def _line(quote: Quote) -> str:
    text = quote.text.replace("\n", " ")
    text = text if len(text) <= 120 else text[:119] + "…"
    author = f" — {quote.author_name}" if quote.author_name else ""
    return f"`#{quote.id}` {text}{author}"


def _removed(result: RemoveResult) -> str:
    text = f"Removed {result.removed} quote{'s' if result.removed != 1 else ''}."
    if result.marked_for_retraining:
        text += " The channel's adapter was trained on them: it will be retrained without them."
    return text


class QuoteCog(commands.GroupCog, group_name="quote", group_description="Quotes of this channel"):
    """The `/quote` command group."""

    def __init__(self, bot: LoracordBot) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="add", description="Save a quote in this channel")
    @app_commands.describe(text="The quote", author="Who said it (a member of this server)")
    @app_commands.guild_only()
    async def add(
        self,
        interaction: discord.Interaction,
        text: app_commands.Range[str, 1, 4000],
        author: discord.Member | None = None,
    ) -> None:
        """`/quote add text [author]`."""
        result = await self.bot.app.store.add(
            _ref(interaction),
            text,
            source="command",
            author_id=str(author.id) if author else None,
            author_name=author.display_name if author else None,
            added_by=str(interaction.user.id),
        )
        await interaction.response.send_message(saved_text(result), ephemeral=True)

    @app_commands.command(name="list", description="The latest quotes of this channel")
    @app_commands.describe(member="Only this member's quotes")
    @app_commands.guild_only()
    async def list_quotes(
        self, interaction: discord.Interaction, member: discord.Member | None = None
    ) -> None:
        """`/quote list [member]`: the newest quotes, with their ids."""
        ref = _ref(interaction)
        store = self.bot.app.store
        found = await store.list_quotes(ref, author_id=member.id if member else None)
        if not found:
            await interaction.response.send_message("No quotes here yet.", ephemeral=True)
            return
        lines = [_line(q) for q in found[-LIST_LIMIT:]]
        more = len(found) - len(lines)
        if more:
            lines.insert(0, f"-# {len(found)} quotes; the newest {len(lines)}:")
        await interaction.response.send_message(
            "\n".join(lines)[:2000], ephemeral=True, allowed_mentions=NO_MENTIONS
        )

    @app_commands.command(name="random", description="A random quote of this channel")
    @app_commands.guild_only()
    async def random(self, interaction: discord.Interaction) -> None:
        """`/quote random`, posted in the channel (mentions never ping)."""
        quote = await self.bot.app.store.random(_ref(interaction))
        if quote is None:
            await interaction.response.send_message("No quotes here yet.", ephemeral=True)
            return
        author = f"\n— {quote.author_name}" if quote.author_name else ""
        await interaction.response.send_message(
            f"> {quote.text.replace(chr(10), chr(10) + '> ')}{author}"[:2000],
            allowed_mentions=NO_MENTIONS,
        )

    @app_commands.command(name="forget", description="Remove your quotes from this server")
    @app_commands.describe(
        member="(admins) remove this member's quotes instead", quote_id="(admins) remove one quote"
    )
    @app_commands.guild_only()
    async def forget(
        self,
        interaction: discord.Interaction,
        member: discord.Member | None = None,
        quote_id: int | None = None,
    ) -> None:
        """`/quote forget`: your own quotes; admins may name a member or one quote id."""
        server = str(_ref(interaction).server)
        others = quote_id is not None or (member is not None and member.id != interaction.user.id)
        if others and not is_admin(interaction.user, self.bot.settings.discord):
            raise NotAdmin()
        store = self.bot.app.store
        if quote_id is not None:
            try:
                result = await store.forget_quote(quote_id, server=server)
            except QuoteNotFound as e:
                raise QuoteNotFound(f"{e}; `/quote list` shows ids") from e
        else:
            result = await store.forget_member(server, (member or interaction.user).id)
        await interaction.response.send_message(_removed(result), ephemeral=True)

    @app_commands.command(name="enable", description="Start collecting quotes here (admins)")
    @app_commands.guild_only()
    @admin_only()
    async def enable(self, interaction: discord.Interaction) -> None:
        """`/quote enable`."""
        await self.bot.app.store.set_collecting(_ref(interaction), True)
        emoji = self.bot.settings.quotes.star_emoji
        await interaction.response.send_message(
            f"Quote collection is on here: {emoji} a message, use the message menu "
            '"Save as quote", or `/quote add`.',
            ephemeral=True,
        )

    @app_commands.command(name="disable", description="Stop collecting quotes here (admins)")
    @app_commands.guild_only()
    @admin_only()
    async def disable(self, interaction: discord.Interaction) -> None:
        """`/quote disable` (saved quotes stay)."""
        await self.bot.app.store.set_collecting(_ref(interaction), False)
        await interaction.response.send_message(
            "Quote collection is off here. Saved quotes stay.", ephemeral=True
        )

    @app_commands.command(name="import", description="Import a quotes file (admins)")
    @app_commands.describe(file="JSON, JSONL, CSV (quote, author, tags) or a fortune file")
    @app_commands.guild_only()
    @admin_only()
    async def import_file(self, interaction: discord.Interaction, file: discord.Attachment) -> None:
        """`/quote import file`: all of the file or nothing."""
        if file.size > IMPORT_MAX_BYTES:
            raise QuoteError(f"{file.filename} is over {IMPORT_MAX_BYTES // 2**20} MB.")
        await interaction.response.defer(ephemeral=True, thinking=True)
        # Parsing an 8 MB file takes a while: never on the event loop (the gateway heartbeat).
        items = await asyncio.to_thread(parse, await file.read(), file.filename)
        report = await self.bot.app.store.import_quotes(
            _ref(interaction), items, added_by=str(interaction.user.id)
        )
        cut = f" {len(report.notices)} were cut to the length limit." if report.notices else ""
        await interaction.followup.send(
            f"Imported {report.added} quotes ({report.duplicates} duplicates skipped).{cut}",
            ephemeral=True,
        )
