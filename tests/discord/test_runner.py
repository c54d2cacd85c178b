"""`loracord` in Discord mode, as a real process: a signal during the first start stops it.

The child process runs the real entry point (`bot.run`) with one change: locating the model
blocks forever, as a first start's build of the embedded model does for minutes. Discord's
addresses point at a fake Discord on 127.0.0.1 that records any attempt to log in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from fake_discord import FakeDiscord

ROOT = Path(__file__).resolve().parents[2]
LOADING = "test: the model is loading"
PROMPT_EXIT_S = 10.0  # "promptly": seconds from the signal to the process's end

CHILD = f"""
import sys, threading

import discord
import yarl

discord.http.Route.BASE = sys.argv[1]
discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(sys.argv[2])

import core.app


def locate(settings):
    print({LOADING!r}, flush=True)
    threading.Event().wait()  # a build that takes minutes


core.app.locate_model = locate
import bot

sys.exit(bot.run([]))
"""


@pytest.fixture
async def fake_discord():
    fake = FakeDiscord()
    await fake.start()
    yield fake
    await fake.close()


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORACORD_", "HF_"))}
    (tmp_path / "none.toml").write_text("")
    env.update(
        DISCORD_TOKEN="runner-test-token",
        LORACORD_CONFIG=str(tmp_path / "none.toml"),
        LORACORD_CACHE_DIR=str(tmp_path / "cache"),
        LORACORD_DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_while_the_model_loads_exits_promptly_without_logging_in(
    tmp_path: Path, fake_discord: FakeDiscord, sig: signal.Signals
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        fake_discord.api_base,
        fake_discord.gateway_url,
        env=_env(tmp_path),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 120)  # type: ignore[union-attr]
        assert line.decode().strip() == LOADING

        child.send_signal(sig)
        _, stderr = await asyncio.wait_for(child.communicate(), PROMPT_EXIT_S)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()

    assert child.returncode == 0, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert fake_discord.requests == []  # never logged in
    assert not fake_discord.identified.is_set()
