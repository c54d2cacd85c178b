"""Who may do what, and where a command runs: admin checks and channel keys.

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
    """The user is not an admin of this bot."""

    def __init__(self) -> None:
        super().__init__(
            "This command is for admins: the Administrator permission, or a role or user "
            "listed in the bot's settings."
        )


def is_admin(user: discord.abc.User, settings: DiscordSettings) -> bool:
    """Administrator permission, or an admin user id or role id from the settings."""
    if user.id in settings.admin_user_ids:
        return True
    if isinstance(user, discord.Member):
        if user.guild_permissions.administrator:
            return True
        if any(role.id in settings.admin_role_ids for role in user.roles):
            return True
    return False


def admin_only() -> Any:
    """An app-command check: the caller must be an admin (raises `NotAdmin`)."""

    async def predicate(interaction: discord.Interaction[LoracordBot]) -> bool:
        if not is_admin(interaction.user, interaction.client.settings.discord):
            raise NotAdmin()
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
