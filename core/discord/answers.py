"""Answers in flight: feed a model's stream into a `StreamedReply`, with a Stop button.

`AnswerBoard` knows every answer the bot is streaming. It keeps the queue places shown to
waiting askers current (refreshed whenever an answer starts or ends, so no timer is needed), and
on shutdown cancels them all so each ends with a message instead of silence. It knows nothing
about which command asked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import discord

from core.errors import LoracordError
from core.model.requests import ResponseStream

from .streaming import NO_MENTIONS, StreamedReply

log = logging.getLogger(__name__)

STOP_EMOJI = "\N{BLACK SQUARE FOR STOP}"
STOPPED = "-# Stopped."
SHUTTING_DOWN = "-# Stopped: the bot is shutting down."


def queue_status(position: int | None) -> str:
    """The line shown while an answer waits or starts."""
    if position:
        ahead = position - 1
        if ahead == 0:
            return "\N{HOURGLASS} Next in line\N{HORIZONTAL ELLIPSIS}"
        return f"\N{HOURGLASS} Waiting in line: {ahead} question{'s' * (ahead > 1)} ahead."
    return "\N{THINKING FACE} Thinking\N{HORIZONTAL ELLIPSIS}"


class StopView(discord.ui.View):
    """A Stop button that only the asker may press."""

    def __init__(self, asker_id: int) -> None:
        super().__init__(timeout=None)
        self.asker_id = asker_id
        self.stream: ResponseStream | None = None
        self.stopped_by: int | None = None

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self.asker_id:
            return True
        await interaction.response.send_message(
            "Only the person who asked can stop this answer.", ephemeral=True
        )
        return False

    @discord.ui.button(label="Stop", style=discord.ButtonStyle.secondary, emoji=STOP_EMOJI)
    async def stop_button(
        self, interaction: discord.Interaction, _button: discord.ui.Button[StopView]
    ) -> None:
        """End the generation; the answer keeps the text produced so far."""
        self.stopped_by = interaction.user.id
        if self.stream is not None:
            self.stream.cancel()
        await interaction.response.defer()


@dataclass(eq=False)
class Answer:
    """One answer being streamed."""

    stream: ResponseStream
    reply: StreamedReply
    view: discord.ui.View | None = None
    shutdown: bool = False
    shown_position: int | None = -1
    # Why the answer could not be shown to the end (its message deleted, Discord failing).
    lost: discord.HTTPException | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class AnswerBoard:
    """The answers the bot is streaming right now."""

    def __init__(self) -> None:
        self.answers: set[Answer] = set()
        self.accepting = True

    @contextmanager
    def track(self, stream: ResponseStream, reply: StreamedReply) -> Iterator[Answer]:
        """Register an answer; whichever way it ends, its generation and Stop button end too."""
        answer = Answer(stream, reply, view=reply.view)
        self.answers.add(answer)
        try:
            yield answer
        finally:
            # Nobody will read the rest: a model left generating would write to its token cap
            # for no one, holding the queue, and a live Stop view would keep its callbacks.
            if stream.finish_reason is None:
                stream.cancel()
            if answer.view is not None:
                answer.view.stop()
            self.answers.discard(answer)
            answer.done.set()

    async def refresh(self) -> None:
        """Show the current queue place on every answer that has not started."""
        for answer in list(self.answers):
            if answer.reply.started or answer.done.is_set():
                continue
            position = answer.stream.queue_position
            if position is None or position == answer.shown_position:
                continue
            answer.shown_position = position
            try:
                await answer.reply.status(queue_status(position))
            except discord.NotFound:  # deleted while waiting, or its token expired: drop it
                log.info("a waiting answer's message is gone; its question is dropped")
                answer.stream.cancel()
            except discord.HTTPException:
                log.warning("could not update a queue place", exc_info=True)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking answers, cancel those in flight and wait for their last edit."""
        self.accepting = False
        answers = list(self.answers)
        for answer in answers:
            answer.shutdown = True
            answer.stream.cancel()
        if answers:
            waits = [asyncio.ensure_future(a.done.wait()) for a in answers]
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for wait in pending:
                wait.cancel()
            if pending:
                log.warning("%d answers did not finish before shutdown", len(pending))

    async def run(self, stream: ResponseStream, reply: StreamedReply) -> Answer:
        """Stream an answer into its reply until it ends; returns the finished `Answer`.

        An answer Discord no longer lets us show (deleted, expired token, a server error) ends
        with `Answer.lost` set instead of an error: nobody is left to tell. On every exit,
        cancellation of the calling task included, the generation stops and so does the view.
        """
        with self.track(stream, reply) as answer:
            try:
                await self._stream(answer)
            except discord.HTTPException as e:
                answer.lost = e
                level = logging.INFO if isinstance(e, discord.NotFound) else logging.WARNING
                log.log(level, "stopped an answer that can no longer be shown: %s", _brief(e))
        await self.refresh()
        return answer

    async def _stream(self, answer: Answer) -> None:
        stream, reply = answer.stream, answer.reply
        await self.refresh()
        failure: LoracordError | None = None
        try:
            async for _piece in stream:
                if not reply.started:
                    await reply.update(stream.received)
                    await self.refresh()
                else:
                    await reply.update(stream.received)
        except LoracordError as e:
            failure = e
        await reply.finish(stream.received, self._footer(answer, failure))

    @staticmethod
    def _footer(answer: Answer, failure: LoracordError | None) -> str:
        lines = [f"-# {notice}" for notice in answer.stream.notices]
        if failure is not None:
            lines.append(f"\N{WARNING SIGN} {failure}")
        elif answer.shutdown:
            lines.append(SHUTTING_DOWN)
        elif answer.stream.finish_reason == "cancelled":
            lines.append(STOPPED)
        if not answer.stream.received.strip() and failure is None:
            lines.insert(0, "-# (no answer)")
        return "\n".join(lines)


def _brief(error: discord.HTTPException) -> str:
    """`404 Unknown Message`: status and Discord's text, without the request it came from."""
    return f"{error.status} {error.text or type(error).__name__}"[:200]


__all__ = ["NO_MENTIONS", "Answer", "AnswerBoard", "StopView", "queue_status"]
