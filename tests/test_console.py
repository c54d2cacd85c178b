"""The local console: commands, channels and streamed answers, driven line by line."""

from __future__ import annotations

import io

from core.app import App
from core.console import Console


async def test_console_asks_moves_and_explains(session_app: App) -> None:
    out = io.StringIO()
    console = Console(session_app, out=out)
    assert await console.handle("#Random")
    assert console.channel == "random"
    before = len(out.getvalue())
    assert await console.handle("/ask What is the capital of France? temperature:0 max_tokens:30")
    answer = out.getvalue()[before:].replace("(queued, place 1)", "").strip()
    assert len(answer.split()) >= 2, answer  # the streamed answer, whatever greedy bf16 says
    assert await console.handle("/nope")
    assert "unknown command /nope" in out.getvalue()
    assert await console.handle("/ask   ")
    assert "error: the prompt is empty" in out.getvalue()
    assert await console.handle("/ask hi temperature:warm")
    assert "bad option value" in out.getvalue()
    assert await console.handle("/help")
    assert "#NAME" in out.getvalue()
    assert not await console.handle("/quit")


async def test_console_run_reads_until_end_of_input(session_app: App) -> None:
    out = io.StringIO()
    lines = iter(["Say hi. max_tokens:4 temperature:0", "/model"])

    def read(prompt: str) -> str:
        out.write(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    await Console(session_app, out=out, channel="general").run(read)
    text = out.getvalue()
    assert "#general> " in text
    assert "kernel:" in text and "bits: 4" in text
