"""What a training looks like in its channel: the progress message, edited, then the result.

A run can outlast an interaction token (15 minutes), so progress goes into an ordinary message
the bot sends in the trained channel and edits, at most once per interval (Discord rate-limits
edits, and a step every second would hit it). The last progress is never lost to the throttle:
a late one is shown when the interval has passed. If someone deletes the message, the progress
edits stop (it was removed on purpose) and the result, which is what the run was for, is posted
as a new message.

The runner names a channel as `str(ChannelRef)` ("channel 123 (server 456)"), which means
nothing to a member: the texts here show the channel's mention instead, and only for the
server they are shown in ("a channel of another server" elsewhere).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from pathlib import Path

import discord

from core.discord import MESSAGE_LIMIT, NO_MENTIONS
from core.store import ChannelRef
from core.training.runner import Progress, TrainOutcome

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 3.0
"""The fewest seconds between two progress edits (the streaming setting may ask for fewer)."""
BAR_WIDTH = 20
SAMPLE_LIMIT = 500
"""Characters of each sample answer shown; the rest is cut (the message holds 2,000)."""
CURVE_FILE = "loss_curve.png"
NO_CURVE = "the loss curve needs the bot to have the Attach Files permission here"

RUNNING = "\N{HOURGLASS WITH FLOWING SAND}"
DONE = {"promoted": "\N{WHITE HEAVY CHECK MARK}", "kept": "\N{PACKAGE}"}
FAILED = "\N{CROSS MARK}"
STOPPED = "\N{BLACK SQUARE FOR STOP}"

Clock = Callable[[], float]


def mention(ref: ChannelRef, guild_id: int | None = None) -> str:
    """The channel as a member reads it: its mention, or a stand-in for another server's."""
    if guild_id is not None and ref.server != str(guild_id):
        return "a channel of another server"
    return f"<#{ref.channel}>"


def named(text: str, ref: ChannelRef, guild_id: int | None = None) -> str:
    """`text` (from the runner) with the channel's store name replaced by its mention."""
    return text.replace(str(ref), mention(ref, guild_id))


def progress_bar(step: int, steps: int) -> str:
    done = min(BAR_WIDTH, round(BAR_WIDTH * step / steps)) if steps > 0 else 0
    return "`" + "\N{FULL BLOCK}" * done + "\N{LIGHT SHADE}" * (BAR_WIDTH - done) + "`"


def progress_text(progress: Progress) -> str:
    """The progress message: the runner's line, and a bar while the steps run."""
    text = f"{RUNNING} Training {named(progress.line(), progress.request.channel)}"
    if progress.phase == "training" and progress.steps > 0:
        percent = 100 * progress.step // progress.steps
        text += f"\n{progress_bar(progress.step, progress.steps)} {percent}%"
    return text


def queued_text(ref: ChannelRef, ahead: int, by: int) -> str:
    """The message as it is first posted, before the run reports anything."""
    place = "starting" if ahead == 0 else f"queued, position {ahead}"
    return f"{RUNNING} Training {mention(ref)}: {place} (asked by <@{by}>)"


def stopped_text(ref: ChannelRef) -> str:
    return f"{STOPPED} Training of {mention(ref)} was cancelled; nothing was saved."


def failed_text(ref: ChannelRef, reason: str) -> str:
    return f"{FAILED} Training of {mention(ref)} failed: {' '.join(named(reason, ref).split())}"


def result_text(outcome: TrainOutcome) -> str:
    """The result: one line for a failed or cancelled run; else the summary and the samples."""
    ref = outcome.channel
    if outcome.status == "cancelled":
        return stopped_text(ref)
    if outcome.status == "failed":
        return failed_text(ref, outcome.reason or "no reason given")
    icon = DONE.get(outcome.status, FAILED)
    lines = [f"{icon} {named(outcome.summary(), ref)}"]
    if prompt := (outcome.samples or {}).get("prompt"):
        lines.append(f"**Asked:** {_cut(prompt)}")
        for label, text in outcome.sample_answers():
            lines.append(f"**{label.capitalize()}:**\n{_quoted(text)}")
    return "\n".join(lines)[:MESSAGE_LIMIT]


def curve_file(outcome: TrainOutcome) -> discord.File | None:
    curve = outcome.curve
    if curve is None or not Path(curve).is_file():
        return None
    return discord.File(curve, filename=CURVE_FILE)


def _cut(text: str) -> str:
    text = text.strip()
    return (
        text if len(text) <= SAMPLE_LIMIT else text[: SAMPLE_LIMIT - 1] + "\N{HORIZONTAL ELLIPSIS}"
    )


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" for line in (_cut(text) or "(nothing)").splitlines())


class ProgressMessage:
    """One training's message in its channel: posted, edited with progress, ended by a result.

    `cancelled` is set by `/train cancel`, so that a request dropped from the queue (its future
    ends with an error, not an outcome) still reads as cancelled. `run_id` is the run this
    message reports, once it started: nightly announcements skip it.
    """

    def __init__(self, channel: discord.abc.Messageable, *, interval: float, clock: Clock) -> None:
        self.channel = channel
        self.interval = interval
        self.clock = clock
        self.message: discord.Message | None = None
        self.run_id: int | None = None
        self.cancelled = False
        self.deleted = False
        self._wanted = ""
        self._shown = ""
        self._last = -math.inf
        self._ended = False
        self._late: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def post(self, text: str) -> None:
        """Send the message (raises `discord.HTTPException` when the bot cannot post there).
        Progress reported while it was being sent is shown after the interval."""
        async with self._lock:
            self._wanted = self._wanted or text
            self.message = await self.channel.send(text, allowed_mentions=NO_MENTIONS)
            self._shown = text
            self._last = self.clock()
        if self._wanted != self._shown:
            self._show_later(self.interval)

    async def update(self, text: str) -> None:
        """Show `text` now if the interval has passed since the last edit, else when it has."""
        self._wanted = text
        if self.message is None or self.deleted or self._ended:
            return  # not posted yet (post shows the latest), or nothing to edit any more
        wait = self.interval - (self.clock() - self._last)
        if wait <= 0:
            await self._render()
        else:
            self._show_later(wait)

    async def finish(self, text: str, file: discord.File | None = None) -> None:
        """Edit the result in (with the loss curve), or post it anew if the message is gone.
        Without the Attach Files permission the result comes without the curve."""
        self._ended = True
        if self._late is not None:
            self._late.cancel()
        async with self._lock:
            try:
                await self._deliver(text, file)
            except discord.Forbidden:
                if file is None:
                    raise
                await self._deliver(f"{text}\n-# {NO_CURVE}"[:MESSAGE_LIMIT], None)

    async def _deliver(self, text: str, file: discord.File | None) -> None:
        if self.message is not None and not self.deleted:
            try:
                await self.message.edit(
                    content=text,
                    attachments=[file] if file else [],
                    allowed_mentions=NO_MENTIONS,
                )
                return
            except discord.NotFound:
                self.deleted = True
                if file is not None:
                    file.reset()
        await self.channel.send(text, files=[file] if file else [], allowed_mentions=NO_MENTIONS)

    def _show_later(self, delay: float) -> None:
        if self._late is None or self._late.done():
            self._late = asyncio.create_task(self._render_after(delay))

    async def _render_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._render()

    async def _render(self) -> None:
        async with self._lock:
            if self.message is None or self.deleted or self._ended:
                return
            if self._wanted == self._shown:
                return
            text = self._wanted
            self._last = self.clock()
            try:
                await self.message.edit(content=text, allowed_mentions=NO_MENTIONS)
            except discord.NotFound:
                self.deleted = True
                log.info("training progress message deleted; the result will be posted anew")
            except discord.HTTPException as e:
                log.warning("could not show training progress: %s", e)
            else:
                self._shown = text
