"""The Discord test harness: the real bot, on SimCord, with the real (or a scripted) engine.

`DiscordHarness` is what the fixtures hand a test: a running SimCord world with one server,
a `#general` channel, members `alice` and `bob`, an `admin` (this server's Administrator role)
and the application's `owner` (a plain member here: owning the bot gives no server rights),
the bot built by `core.discord.create_bot`, the engine probe, and a clock the test drives.
Later issues add their commands' tests on top of it: ask with `h.slash(member, "name", ...)`,
read what the bot sent with `h.response_text(result)`, and check logs with `h.logs`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import discord
import simcord

from core.discord import LoracordBot

log = logging.getLogger(__name__)


class FakeClock:
    """A monotonic clock the test moves; `step` is added on every read (0 = frozen)."""

    def __init__(self, start: float = 1000.0, step: float = 0.0) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ErrorLog(logging.Handler):
    """Collects ERROR records; a test takes the ones it expects, the rest fail it."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def expect(self, text: str) -> list[logging.LogRecord]:
        """Take the ERROR records whose message contains `text`; at least one must exist."""
        taken = [r for r in self.records if text in r.getMessage()]
        assert taken, f"expected an ERROR log containing {text!r}; got {self.messages()}"
        self.records = [r for r in self.records if r not in taken]
        return taken

    def messages(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records]


@dataclass
class WatchedAnswer:
    """One run of the bot's `AnswerBoard.run`: its Stop view, and when (and how) it ended."""

    view: Any
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    answer: Any = None
    error: BaseException | None = None

    async def wait(self, timeout: float = 120.0) -> None:
        await asyncio.wait_for(self.ended.wait(), timeout)


@dataclass
class DiscordHarness:
    """A running bot in a simulated Discord server."""

    env: simcord.Env
    bot: LoracordBot
    probe: Any
    clock: FakeClock
    logs: ErrorLog
    guild: simcord.GuildHandle
    channel: simcord.ChannelHandle
    alice: simcord.MemberActor
    bob: simcord.MemberActor
    admin: simcord.MemberActor  # this server's Administrator (per-server commands)
    owner: simcord.MemberActor  # the application's owner (bot-wide commands)

    async def slash(self, member: Any, name: str, /, channel: Any = None, **options: Any) -> Any:
        """Run a slash command as `member` in `channel` (default #general)."""
        if channel is None and isinstance(member, simcord.UserHandle):
            return await member.slash(name, **options)
        return await member.slash(channel or self.channel, name, **options)

    async def ask(self, member: Any, prompt: str, /, **options: Any) -> Any:
        """`/ask` as `member`; returns SimCord's `InteractionResult`."""
        return await self.slash(member, "ask", prompt=prompt, **options)

    async def answers_done(self) -> None:
        """Wait for every answer in flight to be read to its end, then let the bot settle."""
        await self.probe.wait_ended()
        await self.env.settle()

    async def restart(self) -> LoracordBot:
        """Restart the bot process (new bot, same settings, same simulated world)."""
        self.bot = type(self.bot)(self.bot.app, clock=self.clock)
        self.bot.owner_id = self.owner.id
        await self.env.restart_bot(self.bot)
        return self.bot

    def watch_answers(self) -> list[WatchedAnswer]:
        """Record every answer the bot streams from now on (its view, its end), in order."""
        board = self.bot.answers
        original = board.run
        watched: list[WatchedAnswer] = []

        async def run(stream: Any, reply: Any) -> Any:
            entry = WatchedAnswer(reply.view)
            watched.append(entry)
            try:
                entry.answer = await original(stream, reply)
                return entry.answer
            except BaseException as e:
                entry.error = e
                raise
            finally:
                entry.ended.set()

        board.run = run  # type: ignore[method-assign]
        return watched

    def thread(self, name: str = "thread") -> simcord.ChannelHandle:
        """A public thread under #general."""
        thread = self.env.backend.create_thread(self.channel.id, name, self.alice.id)
        return simcord.ChannelHandle(self.env, self.guild, thread)

    def member(self, name: str, *roles: simcord.RoleHandle) -> simcord.MemberActor:
        """Add another member to the server."""
        return self.guild.add_member(self.env.create_user(name), roles=list(roles))

    def command_errors(self) -> list[BaseException]:
        """Errors the bot's handlers raised (and the error handler answered); reading them
        acknowledges them, so they do not fail the test at teardown."""
        return [getattr(e, "original", None) or e for e in self.env.errors]

    def reconfigure(self, **discord_fields: Any) -> None:
        """Change `[discord]` settings of the running bot (ids known only once the world exists)."""
        settings = self.bot.settings
        section = settings.discord.model_copy(update=discord_fields)
        updated = settings.model_copy(update={"discord": section})
        self.bot.app = dataclasses.replace(self.bot.app, settings=updated)

    def command_syncs(self) -> list[Any]:
        """The bot's command-sync requests (PUT .../commands) so far."""
        return [
            r for r in self.env.http_requests if r.method == "PUT" and r.path.endswith("/commands")
        ]

    def callback_types(self) -> list[int]:
        """The interaction callback types the bot sent, in order (5 = deferred)."""
        return [
            r.json["type"]
            for r in self.env.http_requests
            if r.method == "POST" and r.path.endswith("/callback") and isinstance(r.json, dict)
        ]

    def original_edits(self) -> list[str]:
        """The contents the bot wrote into interaction responses, in order."""
        return [
            r.json["content"]
            for r in self.env.http_requests
            if r.method == "PATCH"
            and r.path.endswith("/messages/@original")
            and isinstance(r.json, dict)
            and "content" in r.json
        ]

    def pings(self, message: Any) -> tuple[bool, list[int], list[int]]:
        """Who a message notified: (@everyone/@here, user ids, role ids), as Discord decided."""
        stored = self.env.backend.get_message(message.channel.id, message.id)
        return stored.mention_everyone, stored.ping_user_ids, stored.ping_role_ids

    @staticmethod
    def messages_of(result: Any) -> list[simcord.ResponseMessage]:
        """The response and follow-ups of an interaction, in order."""
        first = [result.response] if result.response is not None else []
        return first + list(result.followups)

    @staticmethod
    def response_text(result: Any) -> str:
        """Everything the bot wrote for an interaction, joined."""
        return "\n".join(m.content for m in DiscordHarness.messages_of(result))


def answer_of(content: str) -> str:
    """A message's answer text without the bot's small print (`-# ...` lines)."""
    lines = [line for line in content.split("\n") if not line.startswith("-# ")]
    return "\n".join(lines).strip()


def has_buttons(message: discord.Message | simcord.ResponseMessage) -> bool:
    return bool(message.components)
