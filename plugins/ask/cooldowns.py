"""Per-user cooldown for questions, on a clock the bot provides (so tests can drive it)."""

from __future__ import annotations

from collections.abc import Callable

from discord import app_commands


class Cooldowns:
    """One question per user per `seconds`; `hit` raises `CommandOnCooldown` when too soon."""

    def __init__(self, seconds: Callable[[], float], clock: Callable[[], float]) -> None:
        self.seconds = seconds
        self.clock = clock
        self._last: dict[int, float] = {}

    def retry_after(self, user_id: int) -> float:
        """Seconds until `user_id` may ask again (0 when they may now)."""
        last = self._last.get(user_id)
        if last is None:
            return 0.0
        return max(0.0, last + self.seconds() - self.clock())

    def hit(self, user_id: int) -> None:
        """Record a question now, or raise `CommandOnCooldown` if it is too soon."""
        wait = self.retry_after(user_id)
        if wait > 0:
            seconds = self.seconds()
            raise app_commands.CommandOnCooldown(app_commands.Cooldown(1, seconds), wait)
        self._last[user_id] = self.clock()
        if len(self._last) > 10_000:
            horizon = self.clock() - self.seconds()
            self._last = {k: v for k, v in self._last.items() if v > horizon}
