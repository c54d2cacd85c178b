"""Run the bot for real: start the model, connect, and shut down cleanly on SIGINT/SIGTERM.

The signal handlers are in place before the model starts loading, so Ctrl-C or SIGTERM during
a first start's build ends the process promptly, without ever logging in.

Shutdown order: stop taking requests, end in-flight answers with a message (the bot's close),
disconnect from Discord, then close the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from core.errors import LoracordError

from .bot import create_bot

if TYPE_CHECKING:
    from core.app import App

log = logging.getLogger(__name__)


def _install_signal_handlers(stop: asyncio.Event) -> list[signal.Signals]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            continue
        installed.append(sig)
    return installed


async def run_bot(app: App) -> None:
    """Start `app`, serve Discord until SIGINT/SIGTERM or disconnect, then close everything.

    A signal stops it at any stage: while the model loads (a first start builds it for
    minutes) the load is abandoned and the bot never logs in.
    """
    token = app.settings.discord.token
    if not token:
        raise LoracordError("DISCORD_TOKEN is not set; run without it for the local console")
    stop = asyncio.Event()
    installed = _install_signal_handlers(stop)
    try:
        if not await _unless_stopped(app.start(watch_adapters=True, schedule=True), stop):
            log.info("stopped before the model was ready; not connecting to Discord")
            return
        await _serve(app, token, stop)
    finally:
        loop = asyncio.get_running_loop()
        for sig in installed:
            loop.remove_signal_handler(sig)
        await app.close()


async def _unless_stopped(work: Awaitable[object], stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` is set first, which cancels it; True when `work` completed."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not stop.is_set():
        task.result()  # a load failure surfaces here
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, LoracordError):
        await task
    return False


async def _serve(app: App, token: str, stop: asyncio.Event) -> None:
    bot = create_bot(app)
    async with bot:
        serving = asyncio.create_task(bot.start(token), name="discord")
        stopping = asyncio.create_task(stop.wait(), name="stop-signal")
        done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            log.info("shutting down: finishing answers in flight")
        # Trainings stop while the bot can still say so in their progress messages.
        await app.trainer.close()
        await asyncio.sleep(0.5)
        await bot.close()
        stopping.cancel()
        if serving in done:
            serving.result()  # a login failure surfaces here
        else:
            with contextlib.suppress(asyncio.CancelledError):
                await serving
