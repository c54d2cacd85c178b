"""Smoke test: the real bot over real sockets against a fake Discord on 127.0.0.1.

Login, READY, GUILD_CREATE, the command sync payload, and one /ask answered from the real
model: deferred, then the response edited with the model's text. And `run_bot` as `loracord`
runs it: SIGTERM ends the answer in flight with a message, disconnects and closes the app.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import discord
import pytest
import yarl
from fake_discord import APP_ID, CHANNEL_ID, GUILD_ID, FakeDiscord
from fake_engines import EngineProbe
from simbot import answer_of

from core.app import build
from core.discord import create_bot, run_bot
from core.discord.streaming import CURSOR
from core.model.requests import GenerationRequest
from tests.conftest import make_settings

PROMPT = "Say hello to the server."


@pytest.fixture
async def fake_discord(monkeypatch: pytest.MonkeyPatch):
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(
        discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url)
    )
    yield fake
    await fake.close()


async def test_real_bot_over_real_sockets(tmp_path, session_app, fake_discord, error_log) -> None:
    settings = make_settings(tmp_path, discord={"cooldown_seconds": 0})
    app = dataclasses.replace(build(settings), engine=session_app.engine)
    await app.store.open()  # what app.start() does, without starting the shared engine again
    bot = create_bot(app)
    running = asyncio.create_task(bot.start("smoke-token"))
    try:
        await asyncio.wait_for(bot.wait_until_ready(), 60)
        assert bot.user is not None and bot.user.id == APP_ID
        assert [g.id for g in bot.guilds] == [GUILD_ID]  # GUILD_CREATE arrived, with channels
        assert bot.guilds[0].get_channel(CHANNEL_ID) is not None

        sync = next(r for r in fake_discord.requests if r.method == "PUT")
        assert sync.path == f"/applications/{APP_ID}/commands"
        names = {c["name"] for c in sync.body}
        assert names == {"ask", "plugins", "quote", "Save as quote", "adapter", "train"}

        options = [
            {"name": "prompt", "type": 3, "value": PROMPT},
            {"name": "temperature", "type": 10, "value": 0.0},
            {"name": "max_tokens", "type": 4, "value": 12},
        ]
        token = await fake_discord.slash("ask", options)

        def final_edit(fake: FakeDiscord):
            edits = fake.originals(token)
            return next((e for e in edits if e.body.get("components") == []), None)

        final = await fake_discord.wait_for(final_edit)
        callback = next(r for r in fake_discord.requests if r.path.startswith("/interactions/"))
        assert callback.body["type"] == 5  # deferred first
        assert callback.query.get("with_response") in ("1", "true", "True")
        assert fake_discord.requests.index(callback) < fake_discord.requests.index(final)

        params = settings.generation_params(max_new_tokens=12, temperature=0.0)
        stream = await session_app.engine.submit(GenerationRequest.from_prompt(PROMPT, params))
        expected = (await stream.text()).strip()
        assert expected
        assert answer_of(final.body["content"]) == expected
        assert final.body["allowed_mentions"] == {"parse": []}
    finally:
        await bot.close()
        await asyncio.wait_for(running, 30)
        await app.store.close()


class _SharedEngine(EngineProbe):
    """The session's engine, which this test must not close: records the close instead."""

    closed = False

    async def close(self) -> None:
        self.closed = True


async def test_sigterm_ends_answers_in_flight_and_closes_the_app(
    tmp_path, session_app, fake_discord, error_log
) -> None:
    settings = make_settings(tmp_path, discord={"cooldown_seconds": 0})
    settings = settings.model_copy(
        update={"discord": settings.discord.model_copy(update={"token": "smoke-token"})}
    )
    engine = _SharedEngine(session_app.engine)
    app = dataclasses.replace(build(settings), settings=settings, engine=engine)
    running = asyncio.create_task(run_bot(app))
    await fake_discord.wait_for(lambda f: f.commands)
    await asyncio.wait_for(fake_discord.identified.wait(), 30)

    options = [
        {"name": "prompt", "type": 3, "value": "Tell me a very long story about the sea."},
        {"name": "max_tokens", "type": 4, "value": 400},
    ]
    token = await fake_discord.slash("ask", options)
    await fake_discord.wait_for(  # the answer is streaming: text has been shown
        lambda f: any(e.body["content"].endswith(CURSOR) for e in f.originals(token))
    )
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(running, 60)

    final = fake_discord.originals(token)[-1].body
    assert final["content"].endswith("Stopped: the bot is shutting down.")
    assert final["components"] == []
    assert engine.submitted[-1].stream.finish_reason == "cancelled"
    assert engine.closed
