"""The local console: commands, channels and streamed answers, driven line by line."""

from __future__ import annotations

import io
from pathlib import Path

from core.app import App
from core.console import QUOTE_USAGE, Console
from core.names import CONSOLE_SERVER
from core.store import ChannelRef


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


class _InterruptingOut(io.StringIO):
    """Output that presses Ctrl-C (the console's handler) once the answer has begun."""

    def __init__(self) -> None:
        super().__init__()
        self.console: Console | None = None

    def write(self, text: str) -> int:
        written = super().write(text)
        stream = self.console.last_stream if self.console else None
        if stream is not None and stream.received and not stream.cancelled:
            self.console.interrupt()
        return written


async def test_ctrl_c_during_an_answer_cancels_the_request(session_app: App) -> None:
    out = _InterruptingOut()
    console = Console(session_app, out=out)
    out.console = console
    await console.ask("Tell me a very long story about a dragon. max_tokens:1000 temperature:0.8")
    stream = console.last_stream
    assert stream is not None
    assert stream.finish_reason == "cancelled"
    assert stream.completion_tokens < 20, stream.completion_tokens
    assert out.getvalue().endswith("\n[stopped]\n")


async def test_a_bad_channel_name_is_one_line_and_never_a_question(session_app: App) -> None:
    out = io.StringIO()
    console = Console(session_app, out=out, channel="general")
    for line in ("#", "# bad name", "#../../etc/passwd", "#caf\u200be"):
        assert await console.handle(line)
    assert console.channel == "general" and console.last_stream is None
    lines = out.getvalue().splitlines()
    assert lines == [
        "error: '#' is not a channel name: use 1-64 lowercase letters, digits, '-' and '_' "
        "(starting with a letter or digit), or a Discord channel id",
        "error: '# bad name' is not a channel name: use 1-64 lowercase letters, digits, '-' and "
        "'_' (starting with a letter or digit), or a Discord channel id",
        "error: '#../../etc/passwd' is not a channel name: use 1-64 lowercase letters, digits, "
        "'-' and '_' (starting with a letter or digit), or a Discord channel id",
        "error: '#caf\\u200be' is not a channel name: use 1-64 lowercase letters, digits, '-' and "
        "'_' (starting with a letter or digit), or a Discord channel id",
    ]


async def test_quote_commands_work_on_the_apps_store(session_app: App, tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(session_app, out=out, channel="quotes-console")
    ref = ChannelRef(CONSOLE_SERVER, "quotes-console")

    async def said(line: str) -> str:
        before = len(out.getvalue())
        assert await console.handle(line)
        return out.getvalue()[before:]

    assert await said("/quote add Be kind. -- Ada") == (
        "error: quote collection is off in #quotes-console; an admin can turn it on with "
        "/quote enable\n"
    )
    assert await said("/quote enable") == "quote collection is on here\n"
    added = await said("/quote add Be kind. -- Ada")
    (quote,) = await session_app.store.list_quotes(ref)
    assert added == f"saved as quote #{quote.id} in #quotes-console\n"
    assert (quote.text, quote.author_name, quote.source) == ("Be kind.", "Ada", "command")
    assert await said("/quote add Be kind.") == (
        f"already saved as quote #{quote.id} in #quotes-console\n"
    )
    assert await said("/quote random") == f"#{quote.id}  Be kind. — Ada\n"
    source = tmp_path / "q.json"
    source.write_text('[{"quote": "Stay curious.", "author": "Lin"}, {"quote": "Be kind."}]')
    assert await said(f"/quote import {source}") == (
        "imported 1 quotes into #quotes-console (1 duplicates skipped)\n"
    )
    listed = await said("/quote list")
    assert listed.startswith(f"#{quote.id}  Be kind. — Ada\n#") and "Stay curious. — Lin" in listed
    assert (
        await said("/quote list 1") == "2 quotes; the newest 1:\n" + listed.splitlines()[1] + "\n"
    )
    assert await said(f"/quote forget {quote.id}") == "removed 1 quote\n"
    assert await said(f"/quote forget {quote.id}") == (
        f"error: there is no quote #{quote.id} in server console; /quote list shows ids\n"
    )
    assert await said("/quote forget 99999999999999999999999") == (
        "error: there is no quote #99999999999999999999999 in server console; /quote list shows "
        "ids\n"
    )
    assert await said("/quote forget one") == (
        "error: /quote forget takes a quote id (a number), not 'one'\n"
    )
    assert await said("/quote list 0") == (
        "error: /quote list takes a number of quotes above 0, not '0'\n"
    )
    assert await said("/quote") == f"error: {QUOTE_USAGE}\n"
    assert await said("/quote disable") == "quote collection is off here\n"
    assert [q.text for q in await session_app.store.list_quotes(ref)] == ["Stay curious."]
    assert console.last_stream is None  # none of it went to the model
