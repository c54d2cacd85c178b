"""Who may do what, and where a command runs: admin checks and channel keys.

Two kinds of admin (the table is in docs/discord.md): per-server commands (`admin_only`) are for
that server's Administrator or Manage Server; bot-wide commands (`bot_admin_only`) are for the
application's owner and the admins named in the settings, never for any server's Administrator.
Discord's `default_permissions` only hides commands and server admins can change it, so it is
not a security boundary: admin commands check here, in code, on every call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from core.settings import DiscordSettings

if TYPE_CHECKING:
    from .bot import LoracordBot

log = logging.getLogger(__name__)


class NotAdmin(app_commands.CheckFailure):
    """The user is not an admin of this server (for per-server commands)."""

    def __init__(self) -> None:
        super().__init__(
            "This command is for admins of this server: the Administrator or Manage Server "
            "permission, or a role or user listed in the bot's settings."
        )


class NotBotAdmin(app_commands.CheckFailure):
    """The user is neither the bot's owner nor one of the operator's admins (bot-wide commands)."""

    def __init__(self) -> None:
        super().__init__(
            "This command changes the bot for every server, so it is for the bot's owner and "
            "the admins listed in the bot's settings; a server's Administrator permission is "
            "not enough."
        )


def _named_in_settings(user: discord.abc.User, settings: DiscordSettings) -> bool:
    if user.id in settings.admin_user_ids:
        return True
    return isinstance(user, discord.Member) and any(
        role.id in settings.admin_role_ids for role in user.roles
    )


def is_admin(user: discord.abc.User, settings: DiscordSettings) -> bool:
    """Per-server admin: Administrator or Manage Server here, or an admin id from the settings."""
    if _named_in_settings(user, settings):
        return True
    if isinstance(user, discord.Member):
        permissions = user.guild_permissions
        return permissions.administrator or permissions.manage_guild
    return False


async def is_bot_admin(bot: LoracordBot, user: discord.abc.User) -> bool:
    """Bot-wide admin: the application's owner (or team), or an admin id from the settings.

    Any server's Administrator is deliberately not enough: whoever invites the bot to their
    server would otherwise control it for every other server.
    """
    if _named_in_settings(user, bot.settings.discord):
        return True
    return await bot.is_owner(user)  # application info: the owner, or the team's admins


def admin_only() -> Any:
    """An app-command check for per-server commands (raises `NotAdmin`)."""

    async def predicate(interaction: discord.Interaction[LoracordBot]) -> bool:
        if not is_admin(interaction.user, interaction.client.settings.discord):
            raise NotAdmin()
        return True

    return app_commands.check(predicate)


def bot_admin_only() -> Any:
    """An app-command check for bot-wide commands (raises `NotBotAdmin`)."""

    async def predicate(interaction: discord.Interaction[LoracordBot]) -> bool:
        if not await is_bot_admin(interaction.client, interaction.user):
            raise NotBotAdmin()
        return True

    return app_commands.check(predicate)


@dataclass(frozen=True)
class ChannelKey:
    """A server channel as the store keys it; a thread counts as its parent channel."""

    guild_id: int
    channel_id: int


def channel_key(interaction: discord.Interaction) -> ChannelKey | None:
    """The channel whose adapter applies, or None in DMs and user-installed contexts."""
    guild_id = interaction.guild_id
    if guild_id is None:
        return None
    # A user-installed command in a server the bot is not in has no channel adapter; where the
    # bot is a member, the channel's adapter applies whoever installed the command.
    if not interaction.is_guild_integration() and interaction.client.get_guild(guild_id) is None:
        return None
    return channel_key_of(guild_id, interaction.channel)


def channel_key_of(guild_id: int | None, channel: Any) -> ChannelKey | None:
    """The channel key of a channel object in a server (threads resolve to their parent)."""
    if guild_id is None or channel is None:
        return None
    if isinstance(channel, discord.Thread):
        return ChannelKey(guild_id, channel.parent_id)
    return ChannelKey(guild_id, channel.id)
