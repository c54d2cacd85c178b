"""`/adapter`: which LoRA adapter answers in a channel.

`list` and `info` are for everyone; `switch`, `rollback` and `reset` change what a whole channel
hears, so they need Manage Channels there (or the server admin rights of `admin_only`);
`default`, the adapter of every channel without one of its own, is for server admins. Only this
server's adapters are listed, offered in autocomplete and accepted. A thread uses its parent
channel's adapter, so these commands in a thread act on the parent. A refused switch (a corrupt
or mismatched adapter) leaves the channel answering as before.
"""

from __future__ import annotations

import logging
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from core.discord import NO_MENTIONS, LoracordBot, admin_only, channel_key, is_admin
from core.errors import AdapterError
from core.store import ChannelRef

log = logging.getLogger(__name__)

AUTOCOMPLETE_LIMIT = 25  # Discord shows at most 25 choices


class NotChannelManager(app_commands.CheckFailure):
    def __init__(self) -> None:
        super().__init__(
            "Changing a channel's adapter needs the Manage Channels permission here, or the "
            "server's admin rights."
        )


def channel_manager_only() -> Any:
    """An app-command check: Manage Channels in this channel, or a server admin."""

    async def predicate(interaction: discord.Interaction[LoracordBot]) -> bool:
        user = interaction.user
        if is_admin(user, interaction.client.settings.discord):
            return True
        if isinstance(user, discord.Member) and interaction.permissions.manage_channels:
            return True
        raise NotChannelManager()

    return app_commands.check(predicate)


def _ref(interaction: discord.Interaction) -> ChannelRef:
    key = channel_key(interaction)
    if key is None:
        raise AdapterError("Adapters belong to server channels; use this command in one.")
    return ChannelRef.discord(key.guild_id, key.channel_id)


class AdapterCog(
    commands.GroupCog, group_name="adapter", group_description="The LoRA adapter of this channel"
):
    """The `/adapter` command group."""

    def __init__(self, bot: LoracordBot) -> None:
        self.bot = bot
        super().__init__()

    async def _choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if interaction.guild_id is None:
            return []
        names = await self.bot.app.channels.names(str(interaction.guild_id))
        typed = current.strip().lower()
        found = [n for n in names if typed in n][:AUTOCOMPLETE_LIMIT]
        return [app_commands.Choice(name=n, value=n) for n in found]

    @app_commands.command(name="switch", description="Answer in this channel with an adapter")
    @app_commands.describe(adapter="name, name@version, or base for the plain model")
    @app_commands.guild_only()
    @channel_manager_only()
    async def switch(
        self, interaction: discord.Interaction, adapter: app_commands.Range[str, 1, 80]
    ) -> None:
        ref = _ref(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        served = await self.bot.app.channels.switch(ref, adapter, by=str(interaction.user.id))
        text = f"This channel now answers with **{served.describe()}**."
        if served.reason:
            text += f"\n-# {served.reason}"
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    @switch.autocomplete("adapter")
    async def _switch_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return await self._choices(interaction, current)

    @app_commands.command(
        name="default", description="The adapter of this server's channels that have none"
    )
    @app_commands.describe(adapter="name, name@version, base, or clear for no default")
    @app_commands.guild_only()
    @admin_only()
    async def default(
        self, interaction: discord.Interaction, adapter: app_commands.Range[str, 1, 80]
    ) -> None:
        assert interaction.guild_id is not None
        await interaction.response.defer(ephemeral=True, thinking=True)
        choice = None if adapter.strip().lower() == "clear" else adapter
        now = await self.bot.app.channels.set_default(
            str(interaction.guild_id), choice, by=str(interaction.user.id)
        )
        await interaction.followup.send(
            f"Channels of this server without their own adapter now answer with **{now}**.",
            ephemeral=True,
            allowed_mentions=NO_MENTIONS,
        )

    @default.autocomplete("adapter")
    async def _default_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return [
            *await self._choices(interaction, current),
            app_commands.Choice(name="clear", value="clear"),
        ][:AUTOCOMPLETE_LIMIT]

    @app_commands.command(name="reset", description="Answer in this channel from the base model")
    @app_commands.guild_only()
    @channel_manager_only()
    async def reset(self, interaction: discord.Interaction) -> None:
        await self.bot.app.channels.reset(_ref(interaction), by=str(interaction.user.id))
        await interaction.response.send_message(
            "This channel now answers from the base model.", ephemeral=True
        )

    @app_commands.command(name="rollback", description="Go back to the adapter's previous version")
    @app_commands.guild_only()
    @channel_manager_only()
    async def rollback(self, interaction: discord.Interaction) -> None:
        left, now = await self.bot.app.channels.rollback(_ref(interaction))
        target = f"**{now}**" if now else "the base model (there is no earlier version)"
        await interaction.response.send_message(
            f"Rolled back **{left}**; it will not be promoted again. Now: {target}.",
            ephemeral=True,
        )

    @app_commands.command(name="list", description="This server's adapters")
    @app_commands.guild_only()
    async def list_adapters(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        rows = await self.bot.app.channels.listing(str(interaction.guild_id))
        if not rows:
            await interaction.response.send_message(
                "This server has no adapters yet.", ephemeral=True
            )
            return
        lines = []
        for row in rows:
            where = " ".join(f"<#{c}>" for c in row["channels"]) or "no channels"
            promoted = f"`{row['promoted']}`" if row["promoted"] else "none promoted"
            lines.append(f"**{row['name']}**: {promoted}, {len(row['versions'])} versions; {where}")
        await interaction.response.send_message(
            "\n".join(lines)[:2000], ephemeral=True, allowed_mentions=NO_MENTIONS
        )

    @app_commands.command(name="info", description="What answers in this channel, and why")
    @app_commands.guild_only()
    async def info(self, interaction: discord.Interaction) -> None:
        report = await self.bot.app.channels.info(_ref(interaction))
        served = report.served
        bound = served.binding
        lines = [f"This channel answers with **{served.describe()}**."]
        if bound.adapter:
            pin = f"pinned to `{bound.version}`" if bound.version else "its promoted version"
            whose = "this channel's" if bound.source == "channel" else "the server default's"
            lines.append(f"Bound to **{bound.adapter}** ({pin}, {whose} setting).")
        if served.reason:
            lines.append(f"\N{WARNING SIGN} {served.reason}")
        meta = report.meta
        if meta:
            loss = meta.get("eval_loss")
            lines.append(
                f"-# made {meta.get('created_at', '?')} from {meta.get('source', '?')}"
                + (f", eval loss {loss:.3f}" if isinstance(loss, float) else "")
            )
        await interaction.response.send_message(
            "\n".join(lines)[:2000], ephemeral=True, allowed_mentions=NO_MENTIONS
        )
