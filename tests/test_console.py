"""The local console: commands, channels and streamed answers, driven line by line."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

from core.app import App, build
from core.console import HISTORY_FILE, QUOTE_USAGE, TRAIN_USAGE, Console
from core.names import CONSOLE_SERVER
from core.store import ChannelRef
from core.training.runner import Progress, TrainOutcome, TrainRequest
from tests.conftest import make_settings
from tests.test_model import ROOT, _env


async def test_console_asks_moves_and_explains(session_app: App) -> None:
    out = io.StringIO()
    console = Console(session_app, out=out)
    assert await console.handle("#Random")
    assert console.channel == "random"
    before = len(out.getvalue())
    assert await console.handle("/ask What is the capital of France? temperature:0 max_tokens:30")
    answer = out.getvalue()[before:].strip()
    assert "queued" not in answer  # nothing else waits: no queue place
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


class _ConsoleProcess:
    """`loracord` in console mode as a user runs it: stdin a pipe, or a terminal (pty)."""

    def __init__(self, tmp_path: Path, *, terminal: bool = False) -> None:
        env = {**_env(tmp_path), "TERM": "xterm"}
        self.data_dir = Path(env["LORACORD_DATA_DIR"])
        self.master: int | None = None
        if terminal:
            self.master, slave = pty.openpty()
            stdin: int = slave
            stdout: int = slave
        else:
            stdin = stdout = subprocess.PIPE
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bot.py")],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        if terminal:
            os.close(slave)
        assert self.proc.stdout is not None or self.master is not None
        self.fd = self.master if self.master is not None else self.proc.stdout.fileno()  # type: ignore[union-attr]
        self.seen = ""
        self.pos = 0

    def expect(self, text: str, timeout: float = 120) -> str:
        """Read until `text` appears after what was already matched; returns what came before."""
        deadline = time.monotonic() + timeout
        while text not in self.seen[self.pos :]:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in {self.seen[self.pos :]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the terminal closed: the process has gone
                    chunk = b""
                assert chunk, f"output ended without {text!r}: {self.seen[self.pos :]!r}"
                self.seen += chunk.decode("utf-8", "replace")
        at = self.seen.index(text, self.pos)
        before, self.pos = self.seen[self.pos : at], at + len(text)
        return before

    def wait_for_output(self, chars: int, timeout: float = 120) -> None:
        """Read until at least `chars` visible characters came after the last match."""
        deadline = time.monotonic() + timeout
        while len(self.seen[self.pos :].strip()) < chars:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.fd], [], [], left)[0], self.seen
            self.seen += os.read(self.fd, 4096).decode("utf-8", "replace")

    def send(self, text: str) -> None:
        if self.master is not None:
            os.write(self.master, text.encode())
        else:
            assert self.proc.stdin is not None
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()

    def finish(self, timeout: float = 60, keep_terminal: bool = False) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read().decode()
        if self.master is not None and not keep_terminal:
            os.close(self.master)
        return code, stderr


def test_console_ctrl_c_stops_the_answer_then_leaves_at_the_prompt(
    embedded_model_dir: Path, tmp_path: Path
) -> None:
    console = _ConsoleProcess(tmp_path)
    banner = console.expect("#general> ")
    assert banner.startswith("loracord console: ") and banner.count("\n") == 1, banner
    console.send("/ask Tell me a very long story about a dragon. max_tokens:1000 temperature:0.8\n")
    console.wait_for_output(10)  # the answer has begun streaming
    interrupted = time.monotonic()
    console.proc.send_signal(signal.SIGINT)
    console.expect("\n[stopped]\n#general> ", timeout=60)
    # The request was cancelled: the model stopped at once instead of writing 1,000 tokens.
    assert time.monotonic() - interrupted < 30
    console.proc.send_signal(signal.SIGINT)  # at the prompt: leave
    code, stderr = console.finish()
    assert code == 0, stderr
    # Quiet by default: our one notice, no banner, torch warning or progress bar.
    assert stderr == (
        "loracord: no DISCORD_TOKEN set: starting the local console (loading the model...)\n"
    )


def test_console_has_line_editing_and_history_on_a_terminal(
    embedded_model_dir: Path, tmp_path: Path
) -> None:
    console = _ConsoleProcess(tmp_path, terminal=True)
    console.expect("#general> ")
    console.send("#random\r")
    console.expect("now in #random")
    console.expect("#random> ")
    console.send("#genral" + "\x1b[D" * 3 + "e\r")  # left arrows: the missing "e" put back
    console.expect("now in #general")
    console.expect("#general> ")
    console.send("\x1b[A\x1b[A\r")  # up twice: "#random" again, from the history
    console.expect("now in #random")
    console.expect("#random> ")
    console.proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: leave
    code, stderr = console.finish(keep_terminal=True)
    assert code == 0, stderr
    assert console.master is not None
    mode = termios.tcgetattr(console.master)[3]
    assert mode & termios.ECHO and mode & termios.ICANON  # the terminal was given back as found
    os.close(console.master)
    assert "^[" not in console.seen
    history = (console.data_dir / HISTORY_FILE).read_text().split()
    assert history == ["#random", "#general", "#random"]


_BLOCKED_LOAD = """
import sys, threading

import core.app


def locate(settings):
    print("test: the model is loading", flush=True)
    threading.Event().wait()  # a first start's build takes minutes


core.app.locate_model = locate
import bot

sys.exit(bot.run([]))
"""


def test_ctrl_c_while_the_model_loads_stops_the_console_promptly(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_BLOCKED_LOAD)
    env = {**_env(tmp_path), "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "test: the model is loading\n"
        interrupted = time.monotonic()
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert time.monotonic() - interrupted < 10
    assert child.returncode == 130
    assert stdout == ""
    assert stderr == (
        "loracord: no DISCORD_TOKEN set: starting the local console (loading the model...)\n"
    )


async def test_console_adapter_commands(session_app: App, embedded_model_dir: Path) -> None:
    """`/adapter` in the console: the same bindings and registry as Discord and the CLI."""
    from core.adapters import BaseShapes, Fingerprint
    from tests.adapter_kit import write_adapter

    app = session_app
    shapes = BaseShapes.of_model(embedded_model_dir)
    fingerprint = Fingerprint.of_model(embedded_model_dir)
    source = app.settings.data_dir / "console-adapter-src"
    for seed in (21, 22):
        folder = write_adapter(source / str(seed), shapes, seed=seed, strength=0.05)
        app.registry.import_folder(folder, "console-ad", CONSOLE_SERVER, shapes, fingerprint)
    out = io.StringIO()
    console = Console(app, out=out, channel="adapt")

    async def run(line: str) -> str:
        before = len(out.getvalue())
        assert await console.handle(line)
        return out.getvalue()[before:]

    assert "#adapt now answers with console-ad@v2" in await run("/adapter switch console-ad")
    info = await run("/adapter info")
    assert "answers with console-ad@v2" in info and "promoted version" in info
    assert "console-ad  v2  (2 versions)  #adapt" in await run("/adapter list")
    await run("/ask Say hi. max_tokens:3 temperature:0")
    assert console.last_stream is not None and str(console.last_stream.adapter) == "console-ad@v2"
    assert (await app.store.binding(ChannelRef(CONSOLE_SERVER, "other"))).adapter is None
    assert "rolled back console-ad@v2" in await run("/adapter rollback")
    assert "answers with console-ad@v1" in await run("/adapter info")
    assert "error: console-ad@v2 was rejected" in await run("/adapter switch console-ad@v2")
    assert "error: there is no adapter named nope" in await run("/adapter switch nope")
    assert "now answers from the base model" in await run("/adapter reset")
    await run("/ask Say hi. max_tokens:3 temperature:0")
    assert console.last_stream is not None and console.last_stream.adapter is None
    assert "usage: /adapter" in await run("/adapter frobnicate")
    # A server default answers in channels bound to nothing (#adapt is bound to base now).
    assert "now answer with console-ad@v1" in await run("/adapter default console-ad")
    await run("#unbound")
    await run("/ask Say hi. max_tokens:3 temperature:0")
    assert console.last_stream is not None and str(console.last_stream.adapter) == "console-ad@v1"
    assert "now answer with no default" in await run("/adapter default clear")


async def test_console_train_runs_in_the_background(tmp_path: Path) -> None:
    """`/train` in the console, with the runner's `train` faked (no model, no child process):
    the console keeps taking commands while a run waits at `gate`, then prints its result."""
    app = build(make_settings(tmp_path))
    await app.store.open()
    trainer = app.trainer
    gate = asyncio.Event()

    async def train(
        request: TrainRequest, on_progress: object = None, *, wait: bool = False
    ) -> TrainOutcome:
        progress = Progress(request, phase="preparing", run_id=1, adapter="lab")
        trainer.current = progress
        try:
            await gate.wait()
            for step in (1, 2, 3):
                progress.phase, progress.step, progress.steps, progress.loss = (
                    "training",
                    step,
                    3,
                    2.0,
                )
                on_progress(progress)  # type: ignore[operator]
            return TrainOutcome(
                1, request.channel, "lab", "v1", "promoted", "better", base_loss=2.5,
                new_loss=2.1, steps=3, eval_quotes=2, train_quotes=8,
                samples={"prompt": "Say hi.", "base": "Hello.", "new": "Hi\nthere!"},
                curve=tmp_path / "loss_curve.png",
            )  # fmt: skip
        finally:
            trainer.current = None

    trainer.train = train  # type: ignore[method-assign]
    out = io.StringIO()
    console = Console(app, out=out, channel="lab")

    async def run(line: str) -> str:
        before = len(out.getvalue())
        assert await console.handle(line)
        return out.getvalue()[before:]

    try:
        assert await run("/train now") == (
            "training of #lab starts now; its progress is printed here\n"
        )
        await asyncio.sleep(0)  # the queue's worker takes it
        assert await run("/train now") == "error: #lab is already queued or training\n"
        assert await run("#other") == "now in #other\n"
        assert await run("/train now") == (
            "training of #other is queued, position 1; its progress is printed here\n"
        )
        assert await run("/train status") == (
            "training now: #lab: preparing\nqueued: #other\nno nightly schedule is running\n"
        )
        assert await run("/train cancel") == (
            "cancelled the training of #other; nothing of it is saved\n"
        )
        await asyncio.sleep(0)
        assert "[train] #other was not trained: training of #other was cancelled" in out.getvalue()
        assert await run("/train cancel") == "nothing is training or queued in #other\n"

        gate.set()
        for _ in range(200):
            if "loss curve" in out.getvalue():
                break
            await asyncio.sleep(0.01)
        printed = out.getvalue()
        assert "[train] #lab: step 1/3, loss 2.000  [#######.............]\n" in printed
        assert "step 2/3" not in printed  # within PROGRESS_SECONDS of step 1
        assert "[train] #lab: step 3/3, loss 2.000  [####################]\n" in printed
        assert printed.endswith(
            "[train] #lab: lab@v1 promoted\n"
            "held-out loss: base 2.500, current none, new 2.100 (2 held-out quotes, 8 trained "
            "on, 3 steps, 0 s)\n"
            "  asked: Say hi.\n  base model: Hello.\n  new adapter: Hi / there!\n"
            f"  loss curve: {tmp_path / 'loss_curve.png'}\n"
        )
        assert await run("/train auto on") == "nightly training is on for #other\n"
        assert (await app.store.channel_state(ChannelRef.console("other"))).auto_train
        assert await run("/train schedule") == (
            "no nightly schedule is running; nightly training is on for #other\n"
        )
        assert await run("/train auto maybe") == f"error: {TRAIN_USAGE}\n"
    finally:
        await trainer.close()
        await app.store.close()
