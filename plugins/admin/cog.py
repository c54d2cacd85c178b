"""Plugin administration: list the plugins and reload one without restarting the bot.

Bot-wide, so only for the bot's owner and the admins named in the settings (not for a server's
Administrator), and only plugins the `discord.plugins` setting lists can be (re)loaded.
A reload is atomic (discord.py keeps the old version when the new one fails to load), re-syncs
the commands if they changed, and tells the admin what happened.
"""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from core.discord import LoracordBot, bot_admin_only

log = logging.getLogger(__name__)


class AdminCog(
    commands.GroupCog,
    group_name="plugins",
    group_description="Bot plugins (the bot's owner and admins)",
):
    """`/plugins list` and `/plugins reload name`."""

    def __init__(self, bot: LoracordBot) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="list", description="List the plugins and whether they loaded")
    @bot_admin_only()
    async def list_plugins(self, interaction: discord.Interaction) -> None:
        """Loaded plugins, and configured ones that failed."""
        loaded = self.bot.plugin_names()
        lines = [f"\N{WHITE HEAVY CHECK MARK} `{name}`" for name in loaded]
        for name, error in sorted(self.bot.plugin_errors.items()):
            if name not in loaded:
                lines.append(f"\N{CROSS MARK} `{name}`: {_reason(error)}")
        await interaction.response.send_message("\n".join(lines) or "No plugins.", ephemeral=True)

    @app_commands.command(name="reload", description="Reload a plugin and re-sync commands")
    @app_commands.describe(name="The plugin to reload (as in /plugins list)")
    @bot_admin_only()
    async def reload_plugin(self, interaction: discord.Interaction, name: str) -> None:
        """Reload `name`; on failure the old version keeps running."""
        self.bot.check_plugin_allowed(name)  # before deferring: the refusal is one clean reply
        await interaction.response.defer(ephemeral=True, thinking=True)
        was_loaded = name in self.bot.plugin_names()
        if not await self.bot.load_plugin(name):
            kept = " The previous version is still running." if was_loaded else ""
            error = self.bot.plugin_errors.get(name)
            await interaction.followup.send(
                f"\N{CROSS MARK} `{name}` failed to load: {_reason(error)}.{kept}", ephemeral=True
            )
            return
        synced = await self.bot.sync_commands()
        note = " Commands re-synced." if synced else " Commands unchanged."
        await interaction.followup.send(
            f"\N{WHITE HEAVY CHECK MARK} `{name}` reloaded.{note}", ephemeral=True
        )

    @reload_plugin.autocomplete("name")
    async def _plugin_names(
        self, _interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        names = self.bot.settings.discord.plugins  # nothing else can be loaded
        return [
            app_commands.Choice(name=n, value=n) for n in sorted(names) if current.lower() in n
        ][:25]


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    cause = error.__cause__ or error
    return f"{type(cause).__name__}: {cause}"[:300]
