"""/ask: answer a question from the model, streamed into the reply."""

from core.discord import LoracordBot

from .cog import AskCog


async def setup(bot: LoracordBot) -> None:
    await bot.add_cog(AskCog(bot))
