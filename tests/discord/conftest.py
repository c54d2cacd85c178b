"""Fixtures for Discord tests: the real bot on SimCord, real model, strict about ERROR logs.

- `make_harness(engine=None, discord={...}, **settings)`: start a bot in a fresh simulated
  server and return a `DiscordHarness`. Without `engine` it answers from the shared real model
  (`session_app`); pass a `ScriptedEngine` for output the small model cannot produce on demand.
- `make_offline_harness(engine, ...)`: the same without loading the model (scripted engines).
- `harness`: `make_harness()` with the defaults.
- `plugin_dir`: a folder whose packages load as `plugins.<name>` (broken or changing plugins).
- Every ERROR log record during a test fails it unless the test takes it with
  `h.logs.expect(...)` (or `error_log.expect(...)`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import discord
import pytest
import simcord
from fake_engines import EngineProbe
from simbot import DiscordHarness, ErrorLog, FakeClock

import plugins
from core.app import App, build
from core.discord import create_bot
from tests.conftest import make_settings

SETTLE_TIMEOUT = 180.0  # answers from the real model take seconds on a busy 2-core machine

StartHarness = Callable[..., Awaitable[DiscordHarness]]


@pytest.fixture
def error_log() -> Iterator[ErrorLog]:
    """ERROR records during the test; any left untaken fail it."""
    handler = ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
    assert not handler.records, f"unexpected ERROR logs: {handler.messages()}"


@pytest.fixture
async def make_harness(
    session_app: App, tmp_path: Path, error_log: ErrorLog
) -> AsyncIterator[StartHarness]:
    """A factory: start the bot in a fresh simulated server, answering from the real model
    (or from the engine passed in)."""
    async with AsyncExitStack() as stack:
        yield _starter(stack, tmp_path, error_log, session_app.engine)


@pytest.fixture
async def one_row_engine(tmp_path: Path, embedded_model_dir: Path) -> AsyncIterator[Any]:
    """A real engine with one row, so a second question waits in line (the shared engine
    answers eight together)."""
    app = build(make_settings(tmp_path / "one-row", batch_rows=1))
    await app.start()
    yield app.engine
    await app.close()


@pytest.fixture
async def make_offline_harness(tmp_path: Path, error_log: ErrorLog) -> AsyncIterator[StartHarness]:
    """Like `make_harness` without loading the model: pass an engine (a `ScriptedEngine`)."""
    async with AsyncExitStack() as stack:
        yield _starter(stack, tmp_path, error_log, None)


def _starter(stack: AsyncExitStack, tmp_path: Path, logs: ErrorLog, default: Any) -> StartHarness:
    async def start(
        engine: Any = None,
        *,
        discord: dict[str, Any] | None = None,
        clock: FakeClock | None = None,
        **settings_overrides: Any,
    ) -> DiscordHarness:
        engine = engine or default
        assert engine is not None, "make_offline_harness needs an engine"
        section = {"cooldown_seconds": 0.0, **(discord or {})}
        settings = make_settings(tmp_path, discord=section, **settings_overrides)
        probe = EngineProbe(engine)
        clock = clock or FakeClock()
        app = dataclasses.replace(build(settings), engine=probe)  # the model is shared
        await app.store.open()
        stack.push_async_callback(app.store.close)
        bot = create_bot(app, clock=clock)
        env = simcord.Env(bot, settle_timeout=SETTLE_TIMEOUT)
        await env.start()  # not `simcord.run`: its clock context can't leave a fixture
        stack.push_async_callback(_stop, env)
        probe.env = env
        return _world(env, bot, probe, clock, logs)

    return start


async def _stop(env: simcord.Env) -> None:
    await env.shutdown()
    # What simcord's own fixture does: fail on errors the bot raised that no test inspected.
    env._raise_errors_since(env._errors_acknowledged)


def _world(env: simcord.Env, bot: Any, probe: EngineProbe, clock: FakeClock, logs: ErrorLog):
    guild = env.create_guild("loracord test")
    channel = guild.create_text_channel("general")
    admins = guild.create_role("Admins", permissions=discord.Permissions(administrator=True))
    harness = DiscordHarness(
        env=env,
        bot=bot,
        probe=probe,
        clock=clock,
        logs=logs,
        guild=guild,
        channel=channel,
        alice=guild.add_member(env.create_user("alice")),
        bob=guild.add_member(env.create_user("bob")),
        admin=guild.add_member(env.create_user("root"), roles=[admins]),
        owner=guild.add_member(env.create_user("owner")),
    )
    # What the application info says on Discord (SimCord's application is owned by the bot).
    bot.owner_id = harness.owner.id
    return harness


@pytest.fixture
async def harness(make_harness: StartHarness) -> DiscordHarness:
    """The bot with default settings, answering from the real model."""
    return await make_harness()


class PluginDir:
    """Writes plugin packages that load as `plugins.<name>`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.names: set[str] = set()

    def write(self, name: str, source: str) -> None:
        package = self.root / name
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(textwrap.dedent(source))
        self.names.add(name)
        importlib.invalidate_caches()


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginDir]:
    root = tmp_path / "extra_plugins"
    root.mkdir()
    monkeypatch.setattr(plugins, "__path__", [*plugins.__path__, str(root)])
    folder = PluginDir(root)
    yield folder
    for name in folder.names:
        sys.modules.pop(f"plugins.{name}", None)
