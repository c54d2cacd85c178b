"""The local console: the bot's commands in a terminal, with simulated channels.

For trying loracord without a Discord token: `/ask ...` or plain text asks, `#name` moves to
another channel (the local server is called `console`), `/help` lists commands, `/quit` leaves.
Answers stream as they are generated.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import Callable
from typing import TextIO

from core.app import App
from core.errors import LoracordError
from core.model.requests import GenerationRequest

log = logging.getLogger(__name__)

CONSOLE_SERVER = "console"
_CHANNEL = re.compile(r"^#([\w\-]{1,100})$")
_OPTION = re.compile(r"\s(temperature|max_tokens):(\S+)")

HELP = """\
commands:
  /ask PROMPT [temperature:T] [max_tokens:N]   ask the model (plain text works too)
  #NAME                                         move to channel NAME
  /model                                        what model is loaded, and how
  /help                                         this list
  /quit                                         leave (Ctrl-D too)"""


class Console:
    """Reads commands line by line and writes answers as they stream."""

    def __init__(self, app: App, out: TextIO = sys.stdout, channel: str = "general") -> None:
        self.app = app
        self.out = out
        self.channel = channel

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    async def run(self, read_line: Callable[[str], str] | None = None) -> None:
        """Serve until /quit or end of input."""
        read = read_line or input
        info = self.app.engine.info
        if info:
            banner = f"loracord console: {info.name}, {info.kernel} on {info.device}."
            self._write(banner + " /help for commands.\n")
        while True:
            try:
                line = await asyncio.to_thread(read, f"#{self.channel}> ")
            except (EOFError, KeyboardInterrupt):
                self._write("\n")
                return
            if not await self.handle(line):
                return

    async def handle(self, line: str) -> bool:
        """Run one input line; False means quit."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line == "/help":
            self._write(HELP + "\n")
            return True
        if line == "/model":
            info = self.app.engine.info
            self._write(
                "\n".join(f"  {k}: {v}" for k, v in (info.as_dict() if info else {}).items()) + "\n"
            )
            return True
        channel = _CHANNEL.match(line)
        if channel:
            self.channel = channel.group(1).lower()
            self._write(f"now in #{self.channel}\n")
            return True
        if line.startswith("/ask"):
            line = line[4:].strip()
        elif line.startswith("/"):
            self._write(f"unknown command {line.split()[0]}; /help lists them\n")
            return True
        try:
            await self.ask(line)
        except LoracordError as e:
            self._write(f"error: {e}\n")
        return True

    async def ask(self, text: str) -> str:
        """Ask with `/ask`-style options and print the answer as it streams."""
        options = dict(_OPTION.findall(" " + text))
        prompt = _OPTION.sub("", " " + text).strip()
        settings = self.app.settings
        try:
            max_tokens = options.get("max_tokens")
            temperature = options.get("temperature")
            params = settings.generation_params(
                max_new_tokens=None if max_tokens is None else int(max_tokens),
                temperature=None if temperature is None else float(temperature),
            )
        except ValueError as e:
            raise LoracordError(f"bad option value: {e}") from e
        request = GenerationRequest.from_prompt(prompt, params)
        stream = await self.app.engine.submit(request)
        if position := stream.queue_position:
            self._write(f"(queued, place {position})\n")
        async for piece in stream:
            self._write(piece)
        self._write("\n")
        for notice in stream.notices:
            self._write(f"[{notice}]\n")
        return stream.received
