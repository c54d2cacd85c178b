"""Adapters: /adapter switch, list, info, rollback and reset for a channel."""

from core.discord import LoracordBot

from .cog import AdapterCog


async def setup(bot: LoracordBot) -> None:
    await bot.add_cog(AdapterCog(bot))
