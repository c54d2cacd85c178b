"""The local console: the bot's commands in a terminal, with simulated channels.

For trying loracord without a Discord token: `/ask ...` or plain text asks, `#name` moves to
another channel of the local server `console`, `/quote ...` keeps that channel's quotes in the
same store the bot and `loracord quotes` use, `/train ...` fine-tunes that channel's adapter,
`/help` lists commands, `/quit` leaves. Answers stream as they are generated; a training runs in
the background (minutes), printing its progress now and then and its result when it ends, while
the console keeps taking commands.

Input has line editing and a history (readline, kept in data_dir) when it is a terminal.
Ctrl-C during an answer cancels the request, so the model stops at once, and returns to the
prompt; Ctrl-C at the prompt, or end of input, leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TextIO

from core.app import App
from core.errors import LoracordError, QuoteNotFound
from core.model.requests import ChatMessage, ResponseStream
from core.names import CONSOLE_SERVER, channel_name
from core.store import ChannelRef, Quote
from core.training.runner import Progress, TrainOutcome, TrainRequest

log = logging.getLogger(__name__)

HISTORY_FILE = "console_history"
HISTORY_LENGTH = 1000
LIST_LIMIT = 20
PROGRESS_SECONDS = 10.0
"""A training's step lines are printed at most this often (each new phase at once)."""
BAR_WIDTH = 20
_OPTION = re.compile(r"\s(temperature|max_tokens):(\S+)")

HELP = f"""\
commands:
  /ask PROMPT [temperature:T] [max_tokens:N]   ask the model (plain text works too)
  #NAME                                         move to channel NAME
  /quote add TEXT [-- AUTHOR]                   save a quote in this channel
  /quote list [N]                               the newest N quotes here (default {LIST_LIMIT})
  /quote random                                 a random quote of this channel
  /quote forget ID                              remove one quote
  /quote import PATH                            import a JSON, JSONL, CSV or fortune file
  /quote enable | /quote disable                turn collecting quotes here on or off
  /adapter switch NAME[@VERSION] | reset        answer here with an adapter, or the base model
  /adapter list | info | rollback               adapters, what answers here, undo a promotion
  /adapter default NAME | base | clear          the adapter of channels bound to none
  /train now | cancel                           train this channel's adapter in the background
  /train status | schedule                      what trains, what waits, the next nightly run
  /train auto on | off                          nightly training of this channel
  /model                                        what model is loaded, and how
  /help                                         this list
  /quit                                         leave (Ctrl-D or Ctrl-C at the prompt too)
Ctrl-C during an answer stops it."""

QUOTE_USAGE = "usage: /quote add TEXT [-- AUTHOR] | list [N] | random | forget ID | import PATH"
ADAPTER_USAGE = (
    "usage: /adapter switch NAME[@VERSION] | reset | list | info | rollback "
    "| default NAME[@VERSION]|base|clear"
)
TRAIN_USAGE = "usage: /train now | status | cancel | auto on|off | schedule"


class Console:
    """Reads commands line by line and writes answers as they stream."""

    def __init__(self, app: App, out: TextIO = sys.stdout, channel: str = "general") -> None:
        self.app = app
        self.out = out
        self.channel = channel_name(channel)
        self.last_stream: ResponseStream | None = None
        self._answering: ResponseStream | None = None
        self._prompt: asyncio.Future[str | None] | None = None
        self._pending = b""  # piped input read but not yet used

    @property
    def ref(self) -> ChannelRef:
        """The current channel, as the store keys it."""
        return ChannelRef(CONSOLE_SERVER, self.channel)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    async def run(self, read_line: Callable[[str], str] | None = None) -> None:
        """Serve until /quit, end of input or Ctrl-C at the prompt."""
        info = self.app.engine.info
        if info:
            banner = f"loracord console: {info.name}, {info.kernel} on {info.device}."
            self._write(banner + " /help for commands.\n")
        history = self.app.settings.data_dir / HISTORY_FILE
        with _terminal_kept(), _history(history, read_line), self._interrupts():
            read = read_line or (input if sys.stdin.isatty() else self._read_pipe)
            while (line := await self._read(read)) is not None:
                if not await self.handle(line):
                    return

    def interrupt(self) -> None:
        """Ctrl-C: stop the answer being written; at the prompt, leave."""
        if self._answering is not None:
            self._answering.cancel()
        elif self._prompt is not None and not self._prompt.done():
            self._write("\n")
            self._prompt.set_result(None)

    @contextlib.contextmanager
    def _interrupts(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGINT)
        try:
            loop.add_signal_handler(signal.SIGINT, self.interrupt)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            yield
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            signal.signal(signal.SIGINT, previous)  # asyncio.run's own handler, for shutdown

    async def _read(self, read: Callable[[str], str]) -> str | None:
        """One line, or None at end of input. The blocking read runs on a daemon thread: one
        abandoned by Ctrl-C must not keep the process alive, as an executor's thread would."""
        loop = asyncio.get_running_loop()
        self._prompt = future = loop.create_future()

        def settle(line: str | None) -> None:
            if not future.done():
                future.set_result(line)

        def work() -> None:
            try:
                line: str | None = read(f"#{self.channel}> ")
            except EOFError:
                line = None
                self._write("\n")
            except Exception:  # an unreadable input (bad encoding, closed): leave, never hang
                log.debug("console input failed", exc_info=True)
                line = None
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, line)

        threading.Thread(target=work, name="loracord-console-input", daemon=True).start()
        try:
            return await future
        finally:
            self._prompt = None

    def _read_pipe(self, prompt: str) -> str:
        """`input()` for piped input, reading the descriptor itself: a thread left blocked in
        `sys.stdin` (Ctrl-C at the prompt) holds its lock and aborts the interpreter's exit."""
        self._write(prompt)
        while b"\n" not in self._pending:
            chunk = os.read(0, 4096)
            if not chunk:
                if not self._pending:
                    raise EOFError
                break
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode("utf-8", "replace")

    async def handle(self, line: str) -> bool:
        """Run one input line; False means quit. Errors are one line, then the prompt again."""
        line = line.strip()
        if not line:
            return True
        try:
            return await self._dispatch(line)
        except LoracordError as e:
            self._write(f"error: {' '.join(str(e).split())}\n")
        except Exception as e:  # a bug: say so in one line, keep the console alive
            log.debug("console command failed", exc_info=True)
            self._write(f"internal error: {type(e).__name__} (run with -v for details)\n")
        return True

    async def _dispatch(self, line: str) -> bool:
        if line in ("/quit", "/exit"):
            return False
        if line.startswith("#"):  # never a question: a bad name is an error, not a prompt
            self.channel = channel_name(line)
            self._write(f"now in #{self.channel}\n")
            return True
        command, _, rest = line.partition(" ")
        commands: dict[str, Callable[[str], Awaitable[object]]] = {
            "/ask": self.ask,
            "/quote": self.quote,
            "/adapter": self.adapter,
            "/train": self.train,
            "/help": self._help,
            "/model": self._model,
        }
        if not command.startswith("/"):
            await self.ask(line)
        elif command in commands:
            await commands[command](rest.strip())
        else:
            self._write(f"unknown command {command}; /help lists them\n")
        return True

    async def _help(self, _: str) -> None:
        self._write(HELP + "\n")

    async def _model(self, _: str) -> None:
        info = self.app.engine.info
        items = info.as_dict().items() if info else ()
        self._write("".join(f"  {k}: {v}\n" for k, v in items))

    async def ask(self, text: str) -> str:
        """Ask with `/ask`-style options and print the answer as it streams."""
        options = dict(_OPTION.findall(" " + text))
        prompt = _OPTION.sub("", " " + text).strip()
        try:
            max_tokens = options.get("max_tokens")
            temperature = options.get("temperature")
            params = self.app.settings.generation_params(
                max_new_tokens=None if max_tokens is None else int(max_tokens),
                temperature=None if temperature is None else float(temperature),
            )
        except ValueError as e:
            raise LoracordError(f"bad option value: {e}") from e
        stream, served = await self.app.channels.submit(
            self.ref, (ChatMessage("user", prompt),), params
        )
        self.last_stream = self._answering = stream
        if served.reason:
            self._write(f"[{served.reason}; answering with {served.describe()}]\n")
        try:
            if ahead := stream.queue_position:  # requests ahead of this one; none: say nothing
                self._write(f"(queued: {ahead} ahead)\n")
            async for piece in stream:
                self._write(piece)
        finally:
            self._answering = None
            if stream.finish_reason is None:  # left early (an error, a cancelled task)
                stream.cancel()
        self._write("\n[stopped]\n" if stream.finish_reason == "cancelled" else "\n")
        for notice in stream.notices:
            self._write(f"[{notice}]\n")
        return stream.received

    async def quote(self, text: str) -> None:
        """`/quote ACTION ...` on the current channel."""
        action, _, rest = text.partition(" ")
        rest = rest.strip()
        store = self.app.store
        if action == "add" and rest:
            body, _, author = rest.partition(" -- ")
            result = await store.add(
                self.ref,
                body,
                source="command",
                author_name=author.strip() or None,
                added_by=CONSOLE_SERVER,
            )
            for notice in result.notices:
                self._write(f"[{notice}]\n")
            verb = "saved as" if result.created else "already saved as"
            self._write(f"{verb} quote #{result.quote.id} in #{self.channel}\n")
        elif action == "list":
            await self._list(rest)
        elif action == "random" and not rest:
            found = await store.random(self.ref)
            self._write(_quote_line(found) + "\n" if found else f"no quotes in #{self.channel}\n")
        elif action == "forget" and rest:
            await self._forget(rest)
        elif action == "import" and rest:
            await self._import(rest)
        elif action in ("enable", "disable") and not rest:
            state = await store.set_collecting(self.ref, action == "enable")
            self._write(f"quote collection is {'on' if state.collecting else 'off'} here\n")
        else:
            raise LoracordError(QUOTE_USAGE)

    async def adapter(self, text: str) -> None:
        """`/adapter ACTION ...` on the current channel (adapters of the console server)."""
        action, _, rest = text.partition(" ")
        rest = rest.strip()
        channels = self.app.channels
        if action == "switch" and rest:
            served = await channels.switch(self.ref, rest, by=CONSOLE_SERVER)
            self._write(f"#{self.channel} now answers with {served.describe()}\n")
        elif action == "default" and rest:
            default = await channels.set_default(
                CONSOLE_SERVER, None if rest == "clear" else rest, by=CONSOLE_SERVER
            )
            self._write(f"channels without their own adapter now answer with {default}\n")
        elif action == "reset" and not rest:
            await channels.reset(self.ref, by=CONSOLE_SERVER)
            self._write(f"#{self.channel} now answers from the base model\n")
        elif action == "rollback" and not rest:
            left, now = await channels.rollback(self.ref)
            target = str(now) if now else "the base model (no earlier version)"
            self._write(f"rolled back {left} (it will not be promoted again); now {target}\n")
        elif action == "list" and not rest:
            rows = await channels.listing(CONSOLE_SERVER)
            if not rows:
                self._write("no adapters yet; `loracord adapters import` adds one\n")
            for row in rows:
                where = ", ".join(f"#{c}" for c in row["channels"]) or "no channels"
                promoted = row["promoted"] or "none promoted"
                self._write(
                    f"  {row['name']}  {promoted}  ({len(row['versions'])} versions)  {where}\n"
                )
        elif action == "info" and not rest:
            report = await channels.info(self.ref)
            served = report.served
            self._write(f"#{self.channel} answers with {served.describe()}")
            bound = served.binding
            if bound.adapter:
                pin = f"@{bound.version} (pinned)" if bound.version else " (promoted version)"
                self._write(f"; bound to {bound.adapter}{pin} by {bound.source}")
            self._write("\n")
            if served.reason:
                self._write(f"  [{served.reason}]\n")
            if report.meta:
                loss = report.meta.get("eval_loss")
                self._write(
                    f"  made {report.meta.get('created_at', '?')}, from "
                    f"{report.meta.get('source', '?')}"
                    + (f", eval loss {loss:.3f}" if isinstance(loss, float) else "")
                    + "\n"
                )
        else:
            raise LoracordError(ADAPTER_USAGE)

    async def train(self, text: str) -> None:
        """`/train ACTION` on the current channel. `now` only queues the run: its progress and
        result are printed when they come, and the console keeps taking commands meanwhile."""
        action, _, rest = text.partition(" ")
        rest = rest.strip()
        trainer = self.app.trainer
        ref = self.ref
        if action == "now" and not rest:
            request = TrainRequest(ref, "manual", by=CONSOLE_SERVER, title=self.channel)
            future = trainer.submit(request, on_progress=ProgressLines(self._write))
            future.add_done_callback(partial(self._trained, ref))
            queued = trainer.queued()
            ahead = next(i for i, r in enumerate(queued) if r is request)
            ahead += 1 if trainer.current is not None else 0
            place = "starts now" if ahead == 0 else f"is queued, position {ahead}"
            self._write(f"training of {ref} {place}; its progress is printed here\n")
        elif action == "status" and not rest:
            current = trainer.current
            self._write(f"training now: {current.line()}\n" if current else "nothing is training\n")
            if queued := trainer.queued():
                self._write("queued: " + ", ".join(str(r.channel) for r in queued) + "\n")
            self._write(self._next_run() + "\n")
        elif action == "cancel" and not rest:
            if await trainer.cancel(ref):
                self._write(f"cancelled the training of {ref}; nothing of it is saved\n")
            else:
                self._write(f"nothing is training or queued in {ref}\n")
        elif action == "auto" and rest in ("on", "off"):
            await self.app.store.set_auto_train(ref, rest == "on")
            self._write(f"nightly training is {rest} for {ref}\n")
        elif action == "schedule" and not rest:
            state = await self.app.store.channel_state(ref)
            on = "on" if state.auto_train else "off"
            self._write(f"{self._next_run()}; nightly training is {on} for {ref}\n")
        else:
            raise LoracordError(TRAIN_USAGE)

    def _next_run(self) -> str:
        schedule = getattr(self.app, "schedule", None)  # only the bot runs the nightly schedule
        if schedule is None:
            return "no nightly schedule is running"
        when = schedule.next_run()
        if when is None:
            return "no nightly training is scheduled"
        return f"next nightly training: {when:%Y-%m-%d %H:%M %Z}"

    def _trained(self, ref: ChannelRef, future: asyncio.Future[TrainOutcome]) -> None:
        """Print how a `/train now` ended (a run that never started included)."""
        if future.cancelled():
            self._write(f"[train] {ref} was not trained: the training was stopped\n")
        elif (error := future.exception()) is not None:
            self._write(f"[train] {ref} was not trained: {' '.join(str(error).split())}\n")
        else:
            self._write(_result_text(future.result()))

    async def _list(self, rest: str) -> None:
        if rest and not (rest.isdigit() and int(rest) > 0):
            raise LoracordError(f"/quote list takes a number of quotes above 0, not {rest!r}")
        wanted = int(rest) if rest else LIST_LIMIT
        total = await self.app.store.count(self.ref)
        if not total:
            self._write(f"no quotes in #{self.channel}\n")
            return
        found = await self.app.store.list_quotes(
            self.ref, limit=wanted, offset=max(0, total - wanted)
        )
        if total > len(found):
            self._write(f"{total} quotes; the newest {len(found)}:\n")
        self._write("".join(_quote_line(q) + "\n" for q in found))

    async def _forget(self, rest: str) -> None:
        number = rest.removeprefix("#")
        if not number.isdigit():
            raise LoracordError(f"/quote forget takes a quote id (a number), not {rest!r}")
        try:
            result = await self.app.store.forget_quote(int(number), server=CONSOLE_SERVER)
        except QuoteNotFound as e:
            raise QuoteNotFound(f"{e}; /quote list shows ids") from None
        self._write(f"removed {result.removed} quote{'s' if result.removed != 1 else ''}\n")

    async def _import(self, rest: str) -> None:
        from core.quotes_import import read_file

        try:
            (name,) = shlex.split(rest)
        except ValueError:
            raise LoracordError(
                "/quote import takes one file path (quote it if it has spaces)"
            ) from None
        path = Path(name).expanduser()
        # Parsing a large file takes a while: off the event loop.
        items = await asyncio.to_thread(read_file, path)
        report = await self.app.store.import_quotes(self.ref, items, added_by=CONSOLE_SERVER)
        self._write(
            f"imported {report.added} quotes into #{self.channel} "
            f"({report.duplicates} duplicates skipped)\n"
        )


class ProgressLines:
    """A training's progress as console lines: each new phase, and the steps at most every
    `PROGRESS_SECONDS` (a line per step would bury the prompt), with a bar."""

    def __init__(
        self, write: Callable[[str], None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._write = write
        self._clock = clock
        self._phase: str | None = None
        self._last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = self._clock()
        last_step = progress.steps > 0 and progress.step == progress.steps
        if progress.phase == self._phase and now - self._last < PROGRESS_SECONDS and not last_step:
            return
        self._phase, self._last = progress.phase, now
        line = f"[train] {progress.line()}"
        if progress.phase == "training" and progress.steps > 0:
            done = min(BAR_WIDTH, round(BAR_WIDTH * progress.step / progress.steps))
            line += f"  [{'#' * done}{'.' * (BAR_WIDTH - done)}]"
        self._write(line + "\n")


def _result_text(outcome: TrainOutcome) -> str:
    """The outcome's report (summary, sample answers, curve), marked as the training's."""
    return "[train] " + "\n".join(outcome.report()) + "\n"


def _quote_line(quote: Quote) -> str:
    author = f" — {quote.author_name}" if quote.author_name else ""
    return f"#{quote.id}  {quote.text.replace(chr(10), ' / ')}{author}"


@contextlib.contextmanager
def _terminal_kept() -> Iterator[None]:
    """Restore the terminal's mode on the way out: leaving from the prompt (Ctrl-C) abandons a
    readline call that has the terminal in its own mode."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if sys.stdin.isatty() else None
    except (ImportError, OSError, ValueError, AttributeError):  # no terminal: nothing to keep
        saved = None
    if saved is None:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _history(path: Path, read_line: Callable[[str], str] | None) -> Iterator[None]:
    """Line editing and a history kept across sessions, for `input()` on a terminal."""
    if read_line is not None or not sys.stdin.isatty():
        yield
        return
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input
        yield
        return
    readline.set_history_length(HISTORY_LENGTH)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    try:
        yield
    finally:
        try:
            readline.write_history_file(path)
        except OSError as e:
            log.warning("console history not saved to %s: %s", path, e.strerror)
