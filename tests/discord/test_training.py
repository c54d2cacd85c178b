"""/train on SimCord, without training anything: the runner's queue is real, its `train` fake.

`FakeTraining` replaces `TrainingRunner.train` with a coroutine that reports a few steps and
returns an outcome (with a small PNG as the loss curve), at the pace the test sets: each run
waits at `gate`, before its first progress report, until the test opens it. The runner's queue
worker is started by the test, outside the bot's own tasks: SimCord waits for every task the
bot starts to finish or park, and the worker waits for the next request forever.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fake_engines import ScriptedEngine

from core.discord import NotAdmin
from core.store import ChannelRef
from core.training.runner import Progress, TrainOutcome, TrainRequest

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
SAMPLES = {"prompt": "Say hi.", "base": "Hello.", "new": "Hi there, friends!"}


class FakeTraining:
    """Stands in for the trainer's child process; see the module docstring."""

    def __init__(self, h: Any, tmp_path: Path, *, steps: int = 3, advance: float = 5.0) -> None:
        self.h = h
        self.trainer = h.bot.app.trainer
        self.curve = tmp_path / "loss_curve.png"
        self.curve.write_bytes(PNG)
        self.steps = steps
        self.advance = advance  # fake-clock seconds between steps
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.futures: list[asyncio.Future[TrainOutcome]] = []
        self.runs = 0
        submit = self.trainer.submit

        def spy(request: TrainRequest, on_progress: Any = None) -> asyncio.Future[TrainOutcome]:
            future = submit(request, on_progress)
            self.futures.append(future)
            return future

        self.trainer.submit = spy
        self.trainer.train = self.train
        self.trainer.start()

    async def train(
        self, request: TrainRequest, on_progress: Any = None, *, wait: bool = False
    ) -> TrainOutcome:
        self.runs += 1
        progress = Progress(request, phase="preparing", run_id=self.runs, adapter="general")
        self.trainer.current = progress
        self.trainer._cancelled = False  # what the real `train` does at its start

        async def report() -> None:
            self.h.clock.advance(self.advance)
            if on_progress is not None:
                await on_progress(progress)

        try:
            self.started.set()
            await self.gate.wait()
            await report()
            for step in range(1, self.steps + 1):
                if self.trainer._cancelled:
                    return self._outcome(request, progress, "cancelled")
                progress.phase, progress.step, progress.steps = "training", step, self.steps
                progress.loss = 3.0 - step / 10
                await report()
            outcome = self._outcome(request, progress, "promoted")
            for listener in self.trainer.finished:
                await listener(outcome)
            return outcome
        finally:
            self.trainer.current = None

    def _outcome(self, request: TrainRequest, progress: Progress, status: str) -> TrainOutcome:
        done = status == "promoted"
        return TrainOutcome(
            progress.run_id or 0,
            request.channel,
            "general",
            "v1" if done else None,
            status,
            "held-out loss 2.100 beats the base model's 2.500" if done else "cancelled",
            base_loss=2.5 if done else None,
            new_loss=2.1 if done else None,
            steps=self.steps,
            eval_quotes=4,
            train_quotes=20,
            samples=SAMPLES if done else None,
            curve=self.curve if done else None,
        )

    async def finish(self, index: int = -1) -> TrainOutcome:
        """Open the gate, wait for the run's outcome, and for the bot to report it."""
        self.gate.set()
        outcome = await asyncio.wait_for(self.futures[index], 10)
        await self.h.env.settle()
        return outcome


@pytest.fixture
async def h(make_offline_harness):
    return await make_offline_harness(ScriptedEngine(), training={"announce": True})


@pytest.fixture
async def fake_training(tmp_path: Path) -> AsyncIterator[Callable[..., FakeTraining]]:
    """A factory of `FakeTraining`s; their runners' queue workers are stopped afterwards."""
    made: list[FakeTraining] = []

    def make(h: Any, **options: Any) -> FakeTraining:
        made.append(FakeTraining(h, tmp_path, **options))
        return made[-1]

    yield make
    for fake in made:
        await fake.trainer.close()


def _ref(h, channel=None) -> ChannelRef:
    return ChannelRef.discord(h.guild.id, (channel or h.channel).id)


def _edits(h, message_id: int) -> list[str]:
    """The contents the bot edited into one message, in order."""
    return [
        r.json["content"]
        for r in h.env.http_requests
        if r.method == "PATCH"
        and r.path.endswith(f"/messages/{message_id}")
        and isinstance(r.json, dict)
        and "content" in r.json
    ]


def _bot_messages(h, channel=None) -> list[Any]:
    return [m for m in (channel or h.channel).history() if m.author.id == h.bot.user.id]


async def test_train_now_reports_progress_then_the_result_with_the_curve(h, fake_training) -> None:
    fake = fake_training(h)
    done = await h.slash(h.admin, "train now")
    assert done.ephemeral and h.response_text(done) == (
        f"Training of <#{h.channel.id}> starts now; its progress and result are posted there."
    )
    assert h.callback_types() == [5]  # deferred, then answered in a follow-up
    (posted,) = _bot_messages(h)  # an ordinary channel message, not the interaction's reply
    assert posted.content == (
        f"\N{HOURGLASS WITH FLOWING SAND} Training <#{h.channel.id}>: starting (asked by "
        f"<@{h.admin.id}>)"
    )
    await asyncio.wait_for(fake.started.wait(), 10)
    request = fake.trainer.current.request
    assert request.channel == _ref(h) and request.trigger == "manual"
    assert request.by == str(h.admin.id) and request.title == "general"

    outcome = await fake.finish()

    assert outcome.promoted
    (message,) = _bot_messages(h)  # one message (the announcement skips this run)
    edits = _edits(h, message.id)
    assert [e.split("\n")[0] for e in edits[:-1]] == [
        f"\N{HOURGLASS WITH FLOWING SAND} Training <#{h.channel.id}>: preparing",
        *(
            f"\N{HOURGLASS WITH FLOWING SAND} Training <#{h.channel.id}>: step {n}/3, "
            f"loss {3.0 - n / 10:.3f}"
            for n in (1, 2, 3)
        ),
    ]
    assert edits[-2].endswith("100%")
    final = message.content
    assert final == edits[-1]
    assert final.startswith(f"\N{WHITE HEAVY CHECK MARK} <#{h.channel.id}>: general@v1 promoted\n")
    assert "held-out loss: base 2.500, current none, new 2.100" in final
    assert "**Asked:** Say hi.\n**Base model:**\n> Hello.\n**New adapter:**\n> Hi there" in final
    assert [a.filename for a in message.attachments] == ["loss_curve.png"]
    assert not fake.trainer.queued() and fake.trainer.current is None


async def test_progress_edits_are_throttled(make_offline_harness, fake_training) -> None:
    h = await make_offline_harness(ScriptedEngine(), discord={"edit_interval_seconds": 60})
    fake = fake_training(h, steps=10, advance=20.0)  # a report every 20 s
    await h.slash(h.admin, "train now")
    await fake.finish()
    (message,) = _bot_messages(h)
    shown = [e.split("\n")[0].split(": ")[1] for e in _edits(h, message.id)[:-1]]
    assert [s.split(",")[0] for s in shown] == ["step 2/10", "step 5/10", "step 8/10"]
    assert "promoted" in message.content  # the late edit left pending gave way to the result


async def test_non_admins_are_refused_train_now(h, fake_training) -> None:
    fake = fake_training(h)
    for command, options in (
        ("train now", {}),
        ("train cancel", {}),
        ("train auto", {"state": "on"}),
    ):
        refused = await h.slash(h.bob, command, **options)
        assert refused.ephemeral and h.response_text(refused) == str(NotAdmin()), command
    assert [type(e) for e in h.command_errors()] == [NotAdmin] * 3
    assert fake.futures == [] and not _bot_messages(h)
    assert not (await h.bot.app.store.channel_state(_ref(h))).auto_train


async def test_status_shows_the_running_one_and_the_queue_and_cancel_cancels(
    h, fake_training
) -> None:
    fake = fake_training(h)
    other = h.guild.create_text_channel("random")
    await h.slash(h.admin, "train now")
    await asyncio.wait_for(fake.started.wait(), 10)
    queued = await h.slash(h.admin, "train now", channel=other)
    assert h.response_text(queued) == (
        f"Training of <#{other.id}> is queued, position 1; its progress and result are posted "
        "there."
    )
    busy = await h.slash(h.admin, "train now")
    assert busy.ephemeral
    assert h.response_text(busy) == f"<#{h.channel.id}> is already queued or training"
    h.command_errors()  # the busy refusal, answered above

    status = h.response_text(await h.slash(h.alice, "train status"))
    assert status.splitlines() == [
        f"Training now: <#{h.channel.id}>: preparing",
        f"Queued: <#{other.id}>.",
        "No nightly schedule is running.",
    ]

    dropped = await h.slash(h.admin, "train cancel", channel=other)
    assert h.response_text(dropped) == (
        f"Cancelled the training of <#{other.id}>; nothing of it is saved."
    )
    (other_message,) = _bot_messages(h, other)
    assert other_message.content == (
        f"\N{BLACK SQUARE FOR STOP} Training of <#{other.id}> was cancelled; nothing was saved."
    )
    assert fake.trainer.queued() == []

    stopped = await h.slash(h.admin, "train cancel")
    assert "Cancelled the training" in h.response_text(stopped)
    outcome = await fake.finish(0)
    assert outcome.status == "cancelled"
    (message,) = _bot_messages(h)
    assert message.content == (
        f"\N{BLACK SQUARE FOR STOP} Training of <#{h.channel.id}> was cancelled; nothing was saved."
    )
    assert not message.attachments
    nothing = await h.slash(h.admin, "train cancel")
    assert h.response_text(nothing) == f"Nothing is training or queued in <#{h.channel.id}>."
    idle = h.response_text(await h.slash(h.alice, "train status"))
    assert idle.splitlines()[0] == "Nothing is training now."


async def test_a_deleted_progress_message_does_not_stop_the_run(h, fake_training) -> None:
    fake = fake_training(h)
    await h.slash(h.admin, "train now")
    await asyncio.wait_for(fake.started.wait(), 10)
    (progress,) = _bot_messages(h)
    await h.admin.delete(progress)

    outcome = await fake.finish()

    assert outcome.promoted
    (result,) = _bot_messages(h)  # posted anew, with the curve
    assert result.id != progress.id and "general@v1 promoted" in result.content
    assert [a.filename for a in result.attachments] == ["loss_curve.png"]
    assert _edits(h, progress.id) == [
        f"\N{HOURGLASS WITH FLOWING SAND} Training <#{h.channel.id}>: preparing"
    ]  # the first step's edit found it gone; no more were tried
    assert "Nothing is training" in h.response_text(await h.slash(h.alice, "train status"))


async def test_auto_sets_the_flag_and_schedule_tells_when(h) -> None:
    class Schedule:
        def next_run(self) -> datetime | None:
            return datetime(2026, 1, 2, 3, 0, tzinfo=UTC)

    ref = _ref(h)
    done = await h.slash(h.admin, "train auto", state="on")
    assert h.response_text(done) == (
        f"Nightly training is now on for <#{h.channel.id}>. No nightly schedule is running."
    )
    assert (await h.bot.app.store.channel_state(ref)).auto_train

    h.bot.app.schedule = Schedule()
    stamp = int(datetime(2026, 1, 2, 3, 0, tzinfo=UTC).timestamp())
    shown = h.response_text(await h.slash(h.alice, "train schedule"))
    assert shown == (
        f"The next nightly training is <t:{stamp}:F> (<t:{stamp}:R>). Nightly training is on "
        f"for <#{h.channel.id}>."
    )
    await h.slash(h.admin, "train auto", state="off")
    assert not (await h.bot.app.store.channel_state(ref)).auto_train
    assert "is off (`/train auto` turns it on)" in h.response_text(
        await h.slash(h.alice, "train schedule")
    )


async def test_other_runs_are_announced_in_their_channel(h, fake_training) -> None:
    fake = fake_training(h)
    fake.gate.set()
    outcome = await fake.train(TrainRequest(_ref(h), "nightly", by="schedule"))
    await h.env.settle()
    (message,) = _bot_messages(h)
    assert message.content.startswith(f"\N{WHITE HEAVY CHECK MARK} <#{h.channel.id}>: general@v1")
    assert [a.filename for a in message.attachments] == ["loss_curve.png"]
    # A channel the bot is not in (a console channel here) is not announced anywhere.
    await fake.train(TrainRequest(ChannelRef.console("general"), "nightly"))
    await h.env.settle()
    assert _bot_messages(h) == [message] and outcome.promoted
