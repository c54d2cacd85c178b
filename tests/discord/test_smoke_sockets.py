"""Smoke test: the real bot over real sockets against a fake Discord on 127.0.0.1.

Login, READY, GUILD_CREATE, the command sync payload, and one /ask answered from the real
model: deferred, then the response edited with the model's text.
"""

from __future__ import annotations

import asyncio
import dataclasses

import discord
import pytest
import yarl
from fake_discord import APP_ID, FakeDiscord
from simbot import answer_of

from core.app import build
from core.discord import create_bot
from core.model.requests import GenerationParams, GenerationRequest
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
    bot = create_bot(app)
    running = asyncio.create_task(bot.start("smoke-token"))
    try:
        await asyncio.wait_for(bot.wait_until_ready(), 60)
        assert bot.user is not None and bot.user.id == APP_ID
        assert [g.id for g in bot.guilds] and bot.guilds[0].get_channel is not None

        sync = next(r for r in fake_discord.requests if r.method == "PUT")
        assert sync.path == f"/applications/{APP_ID}/commands"
        assert {c["name"] for c in sync.body} == {"ask", "plugins"}

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

        params = GenerationParams(max_new_tokens=12, temperature=0.0, top_p=settings.top_p)
        stream = await session_app.engine.submit(GenerationRequest.from_prompt(PROMPT, params))
        expected = (await stream.text()).strip()
        assert expected
        assert answer_of(final.body["content"]) == expected
        assert final.body["allowed_mentions"] == {"parse": []}
    finally:
        await bot.close()
        await asyncio.wait_for(running, 30)
