"""`/train`: fine-tune a channel's adapter on its quotes, now or nightly.

`now`, `cancel` and `auto` decide what the GPU (or the CPU) does for minutes and what a whole
channel hears next, so they are for this server's admins; `status` and `schedule` are for
everyone. `now` answers at once (queued, or why not) and reports the run in an ordinary message
in the trained channel (see `progress`), because a run can outlast the interaction's token.
With `training.announce` on, the results of other runs (the nightly ones) are posted in their
channel too. A thread trains, and is reported in, its parent channel.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from functools import partial
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from core.discord import NO_MENTIONS, LoracordBot, admin_only, channel_key
from core.errors import TrainingBusy, TrainingError
from core.store import ChannelRef
from core.training.runner import Progress, TrainOutcome, TrainRequest

from .progress import (
    PROGRESS_INTERVAL,
    ProgressMessage,
    curve_file,
    failed_text,
    mention,
    named,
    progress_text,
    queued_text,
    result_text,
    stopped_text,
)

log = logging.getLogger(__name__)

CHANNEL_HELP = "The channel to train (default: this one)"


class TrainingCog(
    commands.GroupCog,
    group_name="train",
    group_description="Fine-tune a channel's adapter on its quotes",
):
    """The `/train` command group, and the announcer of finished runs."""

    def __init__(self, bot: LoracordBot) -> None:
        self.bot = bot
        # The channels whose /train now is in progress, with the message reporting it.
        self.reports: dict[ChannelRef, ProgressMessage] = {}
        self._endings: set[asyncio.Task[None]] = set()
        super().__init__()

    async def cog_load(self) -> None:
        self.bot.app.trainer.finished.append(self._announce)
        # A channel's first adapter is named after the channel's name, not its id.
        self.bot.app.trainer.namer = self._name_of

    async def cog_unload(self) -> None:
        finished = self.bot.app.trainer.finished
        if self._announce in finished:
            finished.remove(self._announce)
        if self.bot.app.trainer.namer == self._name_of:
            self.bot.app.trainer.namer = None

    def _name_of(self, ref: ChannelRef) -> str | None:
        channel = self._visible(ref)
        name = getattr(channel, "name", None)
        return name if isinstance(name, str) else None

    # -- the commands -------------------------------------------------------------------------
    @app_commands.command(name="now", description="Train a channel's adapter on its quotes now")
    @app_commands.describe(channel=CHANNEL_HELP)
    @app_commands.guild_only()
    @admin_only()
    async def now(
        self, interaction: discord.Interaction, channel: discord.TextChannel | None = None
    ) -> None:
        ref, where, title = self._target(interaction, channel)
        await interaction.response.defer(ephemeral=True, thinking=True)
        trainer = self.bot.app.trainer
        interval = max(PROGRESS_INTERVAL, self.bot.settings.discord.edit_interval_seconds)
        report = ProgressMessage(where, interval=interval, clock=self.bot.clock)
        request = TrainRequest(ref, "manual", by=str(interaction.user.id), title=title)
        try:
            future = trainer.submit(request, on_progress=partial(self._progress, report))
        except TrainingBusy as e:
            raise TrainingBusy(named(str(e), ref)) from None
        self.reports[ref] = report
        future.add_done_callback(partial(self._ended, ref, report))
        ahead = _ahead(trainer.queued(), request, running=trainer.current is not None)
        try:
            await report.post(queued_text(ref, ahead, interaction.user.id))
        except discord.HTTPException as e:
            report.cancelled = True
            await trainer.cancel(ref)
            raise TrainingError(
                f"I can't post in {mention(ref)} ({e.text or e.status}), so I did not train it"
            ) from None
        place = "starts now" if ahead == 0 else f"is queued, position {ahead}"
        await interaction.followup.send(
            f"Training of {mention(ref)} {place}; its progress and result are posted there.",
            ephemeral=True,
        )

    @app_commands.command(name="status", description="What trains now, what waits, and when next")
    @app_commands.guild_only()
    async def status(self, interaction: discord.Interaction) -> None:
        trainer = self.bot.app.trainer
        guild_id = interaction.guild_id
        current = trainer.current
        lines = [
            named(f"Training now: {current.line()}", current.request.channel, guild_id)
            if current is not None
            else "Nothing is training now."
        ]
        queued = trainer.queued()
        if queued:
            waiting = ", ".join(mention(r.channel, guild_id) for r in queued)
            lines.append(f"Queued: {waiting}.")
        lines.append(self._next_run())
        await interaction.response.send_message(
            "\n".join(lines), ephemeral=True, allowed_mentions=NO_MENTIONS
        )

    @app_commands.command(
        name="cancel", description="Cancel a channel's running or queued training"
    )
    @app_commands.describe(channel="The channel whose training to cancel (default: this one)")
    @app_commands.guild_only()
    @admin_only()
    async def cancel(
        self, interaction: discord.Interaction, channel: discord.TextChannel | None = None
    ) -> None:
        ref, _, _ = self._target(interaction, channel)
        report = self.reports.get(ref)
        if report is not None:
            report.cancelled = True  # before the queue drops it: its message says cancelled
        if await self.bot.app.trainer.cancel(ref):
            text = f"Cancelled the training of {mention(ref)}; nothing of it is saved."
        else:
            if report is not None:
                report.cancelled = False
            text = f"Nothing is training or queued in {mention(ref)}."
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(name="auto", description="Turn nightly training of a channel on or off")
    @app_commands.describe(
        state="on: train it nightly when it has new quotes", channel=CHANNEL_HELP
    )
    @app_commands.guild_only()
    @admin_only()
    async def auto(
        self,
        interaction: discord.Interaction,
        state: Literal["on", "off"],
        channel: discord.TextChannel | None = None,
    ) -> None:
        ref, _, _ = self._target(interaction, channel)
        await self.bot.app.store.set_auto_train(ref, state == "on")
        text = f"Nightly training is now {state} for {mention(ref)}."
        if state == "on":
            text += " " + self._next_run()
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(name="schedule", description="When the next nightly training runs")
    @app_commands.guild_only()
    async def schedule(self, interaction: discord.Interaction) -> None:
        text = self._next_run()
        key = channel_key(interaction)
        if key is not None:
            ref = ChannelRef.discord(key.guild_id, key.channel_id)
            state = await self.bot.app.store.channel_state(ref)
            on = "on" if state.auto_train else "off (`/train auto` turns it on)"
            text += f" Nightly training is {on} for {mention(ref)}."
        await interaction.response.send_message(text, ephemeral=True)

    # -- helpers ------------------------------------------------------------------------------
    def _target(
        self, interaction: discord.Interaction, channel: discord.TextChannel | None
    ) -> tuple[ChannelRef, discord.abc.Messageable, str | None]:
        """The channel to act on (the option, else this one; a thread's parent), where to post
        about it, and its name (a new adapter is named after it)."""
        if channel is not None:
            return ChannelRef.discord(channel.guild.id, channel.id), channel, channel.name
        key = channel_key(interaction)
        if key is None:
            raise TrainingError("Training is for server channels; use this command in one.")
        found = self.bot.get_channel(key.channel_id)
        if isinstance(found, discord.abc.Messageable):
            return (
                ChannelRef.discord(key.guild_id, key.channel_id),
                found,
                getattr(found, "name", None),
            )
        where = self.bot.get_partial_messageable(key.channel_id, guild_id=key.guild_id)
        return ChannelRef.discord(key.guild_id, key.channel_id), where, None

    def _next_run(self) -> str:
        """One line on the nightly schedule (the bot runs one when it starts; the CLI none)."""
        schedule = getattr(self.bot.app, "schedule", None)
        if schedule is None:
            return "No nightly schedule is running."
        when: datetime | None = schedule.next_run()
        if when is None:
            return "No nightly training is scheduled."
        return (
            f"The next nightly training is {discord.utils.format_dt(when, 'F')} "
            f"({discord.utils.format_dt(when, 'R')})."
        )

    async def _progress(self, report: ProgressMessage, progress: Progress) -> None:
        report.run_id = progress.run_id
        await report.update(progress_text(progress))

    def _ended(
        self, ref: ChannelRef, report: ProgressMessage, future: asyncio.Future[TrainOutcome]
    ) -> None:
        task = asyncio.create_task(self._report_end(ref, report, future))
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)

    async def _report_end(
        self, ref: ChannelRef, report: ProgressMessage, future: asyncio.Future[TrainOutcome]
    ) -> None:
        """Turn the progress message into the result (a run that never started included)."""
        file = None
        if future.cancelled():
            text = stopped_text(ref)
        elif (error := future.exception()) is not None:
            if report.cancelled:
                text = stopped_text(ref)
            elif isinstance(error, TrainingError):
                text = failed_text(ref, str(error))
            else:  # the runner logged it with its traceback
                text = failed_text(ref, "an unexpected error; it has been logged")
        else:
            outcome = future.result()
            text, file = result_text(outcome), curve_file(outcome)
        try:
            if report.message is not None:  # else it could not be posted: the user was told
                await report.finish(text, file)
        except Exception:
            log.warning("could not post the result of training %s", ref, exc_info=True)
        finally:
            if self.reports.get(ref) is report:
                del self.reports[ref]

    async def _announce(self, outcome: TrainOutcome) -> None:
        """Post a finished run's result in its channel (`training.announce`), unless a
        `/train now` message already reports that run."""
        if not self.bot.settings.training.announce:
            return
        if any(r.run_id == outcome.run_id for r in self.reports.values()):
            return
        channel = self._visible(outcome.channel)
        if channel is None:
            return
        file = curve_file(outcome)
        try:
            await channel.send(
                result_text(outcome), files=[file] if file else [], allowed_mentions=NO_MENTIONS
            )
        except discord.HTTPException as e:
            log.warning("could not announce the training of %s: %s", outcome.channel, e)

    def _visible(self, ref: ChannelRef) -> discord.abc.Messageable | None:
        """The Discord channel of `ref` if the bot is in its server and sees it."""
        if not (ref.server.isdigit() and ref.channel.isdigit()):
            return None  # a console channel
        guild = self.bot.get_guild(int(ref.server))
        channel = guild.get_channel(int(ref.channel)) if guild is not None else None
        return channel if isinstance(channel, discord.abc.Messageable) else None


def _ahead(queued: list[TrainRequest], request: TrainRequest, *, running: bool) -> int:
    """How many trainings run or wait before `request` (0: it starts now)."""
    index = next((i for i, r in enumerate(queued) if r is request), 0)
    return index + (1 if running else 0)
