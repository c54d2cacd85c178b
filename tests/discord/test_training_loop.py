"""The whole loop on the real embedded model and a real trainer child process: members star
messages in a channel, the nightly job fires on APScheduler (a fake clock, no sleeping), the
child trains, the version is promoted, the running bot hot-loads it, and `/ask` in that channel
answers through it while another channel is unchanged. Then, beside the running bot: a second
process cannot train while a training runs; the CLI's run made worse on purpose is not
promoted; `kill -9` of a training CLI and `/train cancel` leave no version, the old one serving,
and the dead holder's lock expires.

A few short trainings (about two minutes on 2 cores in all). Adapter and channel names are
unique in the test run: the engine is shared with other tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from simbot import answer_of

from core.model.requests import AdapterRef
from core.scheduler import NightlySchedule
from core.store import ChannelRef
from tests.test_model import _env
from tests.test_scheduler import CLOCK_MODULES, FakeClock

pytestmark = pytest.mark.slow

WORDS = ("zorblat", "quimble", "frondish", "glavering", "snorkwise", "plimber")
QUOTES = [
    f"The {WORDS[n % 6]} {WORDS[(n * 5 + 1) % 6]} {WORDS[(n + 3) % 6]}s the moon, {n} times."
    for n in range(28)
]
TRAINING = {
    "steps": 12,
    "learning_rate": 5e-4,
    "gradient_checkpointing": False,
    "min_new_quotes": 5,
    "nightly_time": "03:00",
    "timezone": "Europe/Paris",
    "lease_seconds": 6.0,
}
PARIS = ZoneInfo("Europe/Paris")
QUESTION = "Tell me about the moon."


@pytest.fixture
def sched_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """APScheduler's clock (see tests/test_scheduler.py)."""
    fake = FakeClock()

    class FakeDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return fake.now.astimezone(tz)

    for module in CLOCK_MODULES:
        monkeypatch.setattr(module, "datetime", FakeDatetime)
    return fake


async def _greedy(h, channel) -> tuple[str, AdapterRef | None]:
    result = await h.slash(
        h.alice, "ask", channel=channel, prompt=QUESTION, temperature=0.0, max_tokens=12
    )
    await h.answers_done()
    return answer_of(result.response.content), h.probe.last.request.adapter


async def _until(predicate, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _cli_env(h, **training: Any) -> dict[str, str]:
    settings = h.bot.app.settings
    env = _env(settings.data_dir.parent)  # the same data_dir: tmp/data
    env.update(
        LORACORD_ADAPTERS_DIR=str(settings.adapters_dir),
        LORACORD_QUOTES_EVAL_PERCENT=str(settings.quotes.eval_percent),
    )
    for key, value in {**TRAINING, **training}.items():
        env[f"LORACORD_TRAINING_{key.upper()}"] = str(value)
    return env


def _train_cli(h, ref: ChannelRef, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "bot.py",
            "train",
            "--channel",
            ref.channel,
            "--server",
            ref.server,
            "--json",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def _trainer_children(marker: str) -> list[int]:
    """Pids of live `python -m core.training` processes whose job file path has `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(cmdline).decode(errors="replace")
        if "core.training" in text and marker in text:
            pids.append(int(entry.name))
    return pids


async def test_stars_to_a_nightly_adapter_served_live_and_what_cannot_go_wrong(
    make_harness, sched_clock: FakeClock
) -> None:
    h = await make_harness(
        discord={
            "plugins": ["ask", "quotes", "adapters", "training"],
            "message_content_intent": True,
        },
        quotes={"eval_percent": 25},
        training=TRAINING,
    )
    app = h.bot.app
    # The queue's worker belongs to the test, not to the bot: SimCord waits for the bot's tasks.
    app.trainer.start()
    zorb = h.guild.create_text_channel("zorb-loop")
    ref = ChannelRef.discord(h.guild.id, zorb.id)
    general = ChannelRef.discord(h.guild.id, h.channel.id)
    before_zorb, served = await _greedy(h, zorb)
    before_general, _ = await _greedy(h, h.channel)
    assert served is None

    # Members star messages; an admin turns nightly training on for the channel.
    assert "on here" in h.response_text(await h.slash(h.admin, "quote enable", channel=zorb))
    await h.slash(h.admin, "train auto", channel=zorb, state="on")
    assert (await app.store.channel_state(ref)).auto_train
    for text in QUOTES:
        message = await h.alice.send(zorb, text)
        await h.bob.react(message, "⭐")
    await h.env.settle()
    assert await app.store.count(ref) == len(QUOTES)

    # The nightly job, through APScheduler itself: not at 02:59, at 03:00 Paris time.
    sched_clock.now = datetime(2026, 3, 2, 2, 0, tzinfo=PARIS)
    schedule = NightlySchedule.from_settings(app.settings, app.trainer.nightly)
    await schedule.start()
    try:
        assert schedule.next_run() == datetime(2026, 3, 2, 3, 0, tzinfo=PARIS)
        sched_clock.now = datetime(2026, 3, 2, 2, 59, tzinfo=PARIS)
        schedule._scheduler.wakeup()
        await asyncio.sleep(0.1)
        assert app.trainer.current is None
        sched_clock.now = datetime(2026, 3, 2, 3, 0, 5, tzinfo=PARIS)
        schedule._scheduler.wakeup()
        await _until(lambda: _training(app), 30, "the nightly training to start")

        # One training at a time across processes: the CLI is refused while the bot trains.
        busy = _train_cli(h, general, _cli_env(h))
        _, err = await asyncio.to_thread(busy.communicate, timeout=120)
        assert busy.returncode == 1 and "another process is training" in err, err

        runs = await _until(lambda: _finished_runs(app, ref), 300, "the nightly training")
    finally:
        await schedule.shutdown()
    (run,) = runs
    assert run.status == "promoted", run.reason
    assert run.trigger == "nightly" and run.new_loss < run.base_loss
    name = run.adapter
    assert name == "zorb-loop" and run.version == "v1"
    assert (await app.store.binding(ref)).adapter == name

    # Hot-loaded by the running bot: /ask in that channel answers through it, #general not.
    assert any(s.ref == AdapterRef(name, "v1") for s in app.engine.adapters())
    after_zorb, served = await _greedy(h, zorb)
    assert served == AdapterRef(name, "v1")
    assert after_zorb != before_zorb
    assert await _greedy(h, h.channel) == (before_general, None)

    # Made worse on purpose (a learning rate that diverges), from the CLI beside the bot:
    # saved with its numbers, not promoted; the channel keeps v1.
    worse = _train_cli(h, ref, _cli_env(h, learning_rate=1.0, warmup_steps=0, steps=4))
    out, err = await asyncio.to_thread(worse.communicate, timeout=300)
    assert worse.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["version"], result["promoted"]) == ("v2", False), result
    assert result["current_loss"] is not None and result["base_loss"] > 0
    assert app.registry.info(name).promoted == "v1"

    # kill -9 of a training CLI: its child dies with it, no version appears, v1 keeps serving,
    # and the dead process's lock expires (lease_seconds = 6) so the next training can start.
    versions = app.registry.info(name).versions
    killed = _train_cli(h, ref, _cli_env(h, steps=500))
    holder = await _until(app.store.training_lock_holder, 180, "the CLI to take the lock")
    children = await _until(
        lambda: _async(_trainer_children(str(app.settings.data_dir))), 180, "the trainer child"
    )
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(10)
    # (a process that is exiting has no command line left but is not yet a zombie: wait for
    # each to be one, or gone, rather than read its state once)
    await _until(
        lambda: _async(
            not _trainer_children(str(app.settings.data_dir)) and all(map(_dead, children))
        ),
        30,
        "the trainer child to die with its parent",
    )
    assert app.registry.info(name).versions == versions
    assert (await _greedy(h, zorb))[1] == AdapterRef(name, "v1")
    await _until(
        lambda: _async(app.store.sync.training_lock_holder() is None),
        30,
        "the dead holder's lease to expire",
    )
    assert holder.run_id is not None

    # /train cancel in the middle of a /train now: nothing saved, the run says cancelled.
    await h.slash(h.admin, "train now", channel=zorb)
    await _until(lambda: _stepping(app), 240, "the training to step")
    cancelled = await h.slash(h.admin, "train cancel", channel=zorb)
    assert "cancel" in h.response_text(cancelled).lower()
    await _until(lambda: _async(app.trainer.current is None), 180, "the cancel")
    runs = await app.store.runs(ref)
    assert [r.status for r in runs[:3]] == ["cancelled", "interrupted", "kept"]
    assert app.registry.info(name).versions == versions
    assert app.registry.info(name).promoted == "v1"
    await app.trainer.close()
    for status in app.engine.adapters():  # the engine is shared with other tests
        if status.ref.name == name:
            await app.engine.unload_adapter(status.ref)


def _dead(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (its parent was killed)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


async def _async(value: Any) -> Any:
    return value


async def _training(app) -> bool:
    return app.trainer.current is not None


async def _stepping(app) -> bool:
    current = app.trainer.current
    return current is not None and current.phase == "training" and current.step >= 1


async def _finished_runs(app, ref: ChannelRef) -> list[Any]:
    """The channel's runs once none is running and the bot's trainer is idle: a run is
    recorded before the bot hot-loads its version, within the same job."""
    runs = await app.store.runs(ref)
    done = runs and all(r.status != "running" for r in runs) and app.trainer.current is None
    return runs if done else []
