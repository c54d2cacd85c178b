"""Training: /train now, status, cancel, auto and schedule; nightly results announced."""

from core.discord import LoracordBot

from .cog import TrainingCog


async def setup(bot: LoracordBot) -> None:
    await bot.add_cog(TrainingCog(bot))
