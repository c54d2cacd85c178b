"""The /ask command, and replies that continue a conversation with the bot.

`/ask` defers at once, submits the question, shows its place in the queue, streams the answer
with a Stop button for the asker, and remembers the conversation so that a reply to the answer
continues it. Replying to one of the bot's messages (or mentioning the bot, if enabled) asks
with the reply chain as context.
"""

from __future__ import annotations

import logging
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from core.discord import (
    ChannelKey,
    LoracordBot,
    PostFirst,
    PostMore,
    StopView,
    StreamedReply,
    channel_key,
    channel_key_of,
    cooldown_message,
    reply_chain,
)
from core.errors import LoracordError
from core.model.requests import ChatMessage, GenerationParams

from .cooldowns import Cooldowns

log = logging.getLogger(__name__)

DM_REFUSED = "I only answer in servers; ask me in a server channel."
UNREADABLE = (
    "I can't read replies here unless they mention me (the bot runs without the message "
    "content intent): mention me in your reply, or use /ask."
)


class AskCog(commands.Cog):
    """Questions to the model: /ask and replies to the bot's answers."""

    def __init__(self, bot: LoracordBot) -> None:
        self.bot = bot
        self.cooldowns = Cooldowns(lambda: bot.settings.discord.cooldown_seconds, bot.clock)

    # -- /ask --------------------------------------------------------------------------------
    @app_commands.command(name="ask", description="Ask the model a question")
    @app_commands.describe(
        prompt="Your question",
        temperature="0 = always the same answer; higher = more varied (default from settings)",
        max_tokens="Longest answer, in tokens (capped by the bot's settings)",
    )
    @app_commands.allowed_installs(guilds=True, users=True)
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=True)
    async def ask(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 4000],
        temperature: app_commands.Range[float, 0.0, 2.0] | None = None,
        max_tokens: app_commands.Range[int, 1, None] | None = None,
    ) -> None:
        """Answer `prompt`, streaming the reply."""
        self._ensure_accepting()
        channel = channel_key(interaction)
        self._check_context(channel)
        self.cooldowns.hit(interaction.user.id)
        await interaction.response.defer(thinking=True)
        turns = (ChatMessage("user", prompt),)
        view = StopView(interaction.user.id)
        reply = self._reply_for_interaction(interaction, view)
        # A refusal after the deferral (busy, no model) propagates to the error handler, whose
        # follow-up replaces the "thinking" message: Discord does not post a follow-up once
        # that message is deleted, so deleting it first would leave the asker with nothing.
        await self._answer(turns, channel, view, reply, temperature, max_tokens)

    def _reply_for_interaction(
        self, interaction: discord.Interaction, view: StopView
    ) -> StreamedReply:
        async def post_first(
            content: str, first_view: discord.ui.View | None
        ) -> discord.InteractionMessage:
            if first_view is None:
                return await interaction.edit_original_response(
                    content=content, allowed_mentions=discord.AllowedMentions.none()
                )
            return await interaction.edit_original_response(
                content=content, view=first_view, allowed_mentions=discord.AllowedMentions.none()
            )

        async def post_more(content: str) -> discord.WebhookMessage:
            return await interaction.followup.send(
                content, wait=True, allowed_mentions=discord.AllowedMentions.none()
            )

        return self._streamed_reply(post_first, post_more, view)

    def _streamed_reply(
        self, post_first: PostFirst, post_more: PostMore, view: StopView
    ) -> StreamedReply:
        return StreamedReply(
            post_first,
            post_more,
            interval=self.bot.settings.discord.edit_interval_seconds,
            clock=self.bot.clock,
            view=view,
        )

    # -- shared ------------------------------------------------------------------------------
    def _ensure_accepting(self) -> None:
        if not self.bot.answers.accepting:
            raise LoracordError("the bot is shutting down; ask again when it is back")

    def _check_context(self, channel: ChannelKey | None) -> None:
        if channel is None and self.bot.settings.discord.dm_policy == "refuse":
            raise LoracordError(DM_REFUSED)

    def _params(self, temperature: float | None, max_tokens: int | None) -> GenerationParams:
        return self.bot.settings.generation_params(
            max_new_tokens=max_tokens, temperature=temperature
        )

    async def _answer(
        self,
        turns: tuple[ChatMessage, ...],
        channel: ChannelKey | None,
        view: StopView,
        reply: StreamedReply,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        """Submit the conversation, stream the answer, remember it for replies."""
        params = self._params(temperature, max_tokens)
        stream, _ = await self.bot.ask(channel, turns, params)
        view.stream = stream
        answer = await self.bot.answers.run(stream, reply)  # stops the view however it ends
        if answer.lost is None and answer.stream.received.strip():
            history = (*turns, ChatMessage("assistant", answer.stream.received.strip()))
            self.bot.conversations.remember([m.id for m in reply.messages], history)

    # -- replies -----------------------------------------------------------------------------
    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """A reply to one of the bot's messages (or a mention, if enabled) asks the model."""
        me = self.bot.user
        if me is None or message.author.bot or not await self._addressed(message):
            return
        channel = channel_key_of(message.guild.id if message.guild else None, message.channel)
        if not self.bot.answers.accepting:
            return
        try:
            self._check_context(channel)
            self.cooldowns.hit(message.author.id)
        except (LoracordError, app_commands.CommandOnCooldown) as e:
            await message.reply(_refusal(e), mention_author=False)
            return
        turns = await reply_chain(
            message, me, self.bot.conversations, self.bot.settings.discord.reply_chain_limit
        )
        if not turns[-1].content:
            if not self.bot.intents.message_content:
                await message.reply(UNREADABLE, mention_author=False)
            return
        view = StopView(message.author.id)
        last: list[discord.Message] = [message]

        async def post_first(content: str, first_view: discord.ui.View | None) -> discord.Message:
            extra: dict[str, Any] = {"view": first_view} if first_view is not None else {}
            sent = await message.reply(
                content,
                mention_author=False,
                allowed_mentions=discord.AllowedMentions.none(),
                **extra,
            )
            last[0] = sent
            return sent

        async def post_more(content: str) -> discord.Message:
            sent = await last[0].reply(
                content, mention_author=False, allowed_mentions=discord.AllowedMentions.none()
            )
            last[0] = sent
            return sent

        reply = self._streamed_reply(post_first, post_more, view)
        try:
            await self._answer(tuple(turns), channel, view, reply)
        except LoracordError as e:
            await message.reply(f"\N{WARNING SIGN} {e}", mention_author=False)

    async def _addressed(self, message: discord.Message) -> bool:
        me = self.bot.user
        ref = message.reference
        if ref is not None and ref.message_id is not None:
            resolved = ref.resolved if isinstance(ref.resolved, discord.Message) else None
            if ref.message_id in self.bot.conversations:
                return True
            if resolved is not None and me is not None and resolved.author.id == me.id:
                return True
        return (
            self.bot.settings.discord.answer_on_mention
            and me is not None
            and me in message.mentions
        )


def _refusal(error: Exception) -> str:
    if isinstance(error, app_commands.CommandOnCooldown):
        return cooldown_message(error.retry_after)
    return str(error)
