"""/plugins list and /plugins reload (admins)."""

from core.discord import LoracordBot

from .cog import AdminCog


async def setup(bot: LoracordBot) -> None:
    await bot.add_cog(AdminCog(bot))
