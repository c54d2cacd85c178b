"""Engines for Discord tests: a probe around the real engine, and a scripted one.

`EngineProbe` wraps any engine and records every request and stream, so a test can assert on
what the bot asked the model (the reply chain, the capped token budget, the adapter's channel).
With `hold = True` each wait for the next token is declared to SimCord as an external wait, so
an actor's verb returns while the answer is still streaming (to press Stop, or to see a queue).

`ScriptedEngine` streams fixed pieces: for output shapes the small model cannot be made to
produce on demand (a 4,000-character answer, `@everyone`), driven through the real plugin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.model.requests import GenerationRequest


class ScriptedStream:
    """The public surface of `ResponseStream`, fed from a list of pieces."""

    def __init__(self, request: GenerationRequest, pieces: Sequence[str]) -> None:
        self.request = request
        self.notices: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._pieces = list(pieces)
        self._text: list[str] = []
        self._cancelled = False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> str:
        await asyncio.sleep(0)
        if self._cancelled or not self._pieces:
            self.finish_reason = self.finish_reason or ("cancelled" if self._cancelled else "stop")
            raise StopAsyncIteration
        piece = self._pieces.pop(0)
        self._text.append(piece)
        self.completion_tokens += 1
        return piece

    async def text(self) -> str:
        async for _ in self:
            pass
        return self.received

    @property
    def received(self) -> str:
        return "".join(self._text)

    @property
    def queue_position(self) -> int | None:
        return None if self.finish_reason else 0

    def cancel(self) -> None:
        self._cancelled = True


class ScriptedEngine:
    """Answers every request with the next script (the last one repeats)."""

    def __init__(self, *scripts: Sequence[str]) -> None:
        self.scripts = [list(s) for s in scripts] or [["ok"]]

    async def submit(self, request: GenerationRequest) -> ScriptedStream:
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        return ScriptedStream(request, script)


@dataclass
class Submitted:
    """One request the bot made, with its stream."""

    request: GenerationRequest
    stream: Any
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class ProbedStream:
    """A stream as the bot sees it, recorded by the probe."""

    def __init__(self, record: Submitted, probe: EngineProbe) -> None:
        self._record = record
        self._probe = probe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._record.stream, name)

    def __aiter__(self) -> ProbedStream:
        return self

    async def __anext__(self) -> str:
        inner = self._record.stream
        try:
            if self._probe.hold and self._probe.env is not None:
                return await self._probe.env.external_wait(
                    inner.__anext__(), reason="the model's next token"
                )
            return await inner.__anext__()
        except BaseException:
            self._record.ended.set()
            raise


class EngineProbe:
    """Records what the bot submits; optionally lets verbs return while answers stream."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.submitted: list[Submitted] = []
        self.hold = False
        self.env: Any = None

    async def submit(self, request: GenerationRequest) -> ProbedStream:
        stream = await self.engine.submit(request)
        record = Submitted(request, stream)
        self.submitted.append(record)
        return ProbedStream(record, self)

    @property
    def last(self) -> Submitted:
        assert self.submitted, "the bot submitted nothing to the engine"
        return self.submitted[-1]

    async def wait_ended(self, timeout: float = 120.0) -> None:
        """Wait until every submitted stream has been read to its end by the bot."""
        waits = [record.ended.wait() for record in self.submitted]
        await asyncio.wait_for(asyncio.gather(*waits), timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)
