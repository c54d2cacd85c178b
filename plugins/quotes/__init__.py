"""Quotes: star reactions, the "Save as quote" menu, and /quote."""

from core.discord import LoracordBot

from .cog import QuoteCog
from .collect import QuoteCollector


async def setup(bot: LoracordBot) -> None:
    await bot.add_cog(QuoteCog(bot))
    await bot.add_cog(QuoteCollector(bot))
