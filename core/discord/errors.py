"""The one error path for app commands: a user never gets silence.

Our own errors (`LoracordError`) and failed checks become an ephemeral message with their text.
Anything else is a bug: it is logged with its traceback and the user gets a generic message.
"""

from __future__ import annotations

import logging
import math

import discord
from discord import app_commands

from core.errors import LoracordError

log = logging.getLogger(__name__)

GENERIC = "Something went wrong on my side; it has been logged. Please try again later."


def user_message(error: BaseException) -> str | None:
    """The message to show for an expected error, or None for a bug."""
    original = getattr(error, "original", None) or error
    if isinstance(original, LoracordError):
        return str(original)
    if isinstance(original, app_commands.CommandOnCooldown):
        return cooldown_message(original.retry_after)
    if isinstance(original, app_commands.CheckFailure):
        return str(original) or "You can't use this command here."
    return None


def cooldown_message(retry_after: float) -> str:
    """What a user on cooldown is told."""
    return f"Slow down: you can ask again in {max(1, math.ceil(retry_after))} s."


async def reply_ephemeral(interaction: discord.Interaction, text: str) -> None:
    """Answer privately, whether or not the interaction was already answered or deferred."""
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True)
    else:
        await interaction.response.send_message(text, ephemeral=True)


async def on_app_command_error(
    interaction: discord.Interaction, error: app_commands.AppCommandError
) -> None:
    """The tree's error handler (installed by the bot)."""
    message = user_message(error)
    if message is None:
        command = interaction.command.qualified_name if interaction.command else "?"
        original = getattr(error, "original", None) or error
        log.error("command /%s failed", command, exc_info=original)
        message = GENERIC
    try:
        await reply_ephemeral(interaction, message)
    except discord.HTTPException:
        log.warning("could not tell the user about an error", exc_info=True)
