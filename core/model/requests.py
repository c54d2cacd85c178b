"""What goes into the engine and what comes back: requests, parameters and the response stream.

These types are the whole interface of the engine; any backend,
in-process or a vLLM server, takes a `GenerationRequest` and hands back a `ResponseStream`.
They know nothing about torch, tokenizers or Discord.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from core.errors import LoracordError, ModelError, PromptError

log = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: Role
    content: str


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter version the engine has loaded, or None for the base model."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


# The system prompt every front uses unless settings say otherwise. Empty means the model's
# own default (the one its chat template carries, which it was trained with): on the embedded
# model every custom prompt measured made answers worse (BENCHMARKS.md, "Answer defaults").
DEFAULT_SYSTEM_PROMPT = ""
# A custom prompt of the kind operators write, so calibration covers prompts besides the default.
CUSTOM_SYSTEM_PROMPT_EXAMPLE = (
    "You are loracord, a friendly assistant in a Discord server. Answer briefly and helpfully."
)


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings. temperature 0 means greedy, as in the seed recipe.

    Values are checked on construction, so a bad option is refused by whichever front built
    it, before any model work. `repetition_penalty` divides the logits of tokens already in the
    prompt or answer (CTRL's penalty, as transformers applies it); 1.0 turns it off.
    """

    max_new_tokens: int = 200
    temperature: float = 0.2
    top_p: float = 0.9
    seed: int | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise PromptError("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise PromptError("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            raise PromptError("top_p must be above 0 and at most 1")
        if not 1.0 <= self.repetition_penalty <= 2.0:
            raise PromptError("repetition_penalty must be between 1 and 2")


@dataclass(frozen=True)
class GenerationRequest:
    """Chat messages (a reply chain gives several), the adapter, and sampling settings."""

    messages: Sequence[ChatMessage]
    adapter: AdapterRef | None = None
    params: GenerationParams = field(default_factory=GenerationParams)

    @classmethod
    def from_prompt(
        cls, prompt: str, params: GenerationParams | None = None, adapter: AdapterRef | None = None
    ) -> GenerationRequest:
        """A one-turn request: the usual `/ask` shape."""
        return cls((ChatMessage("user", prompt),), adapter, params or GenerationParams())


FinishReason = Literal["stop", "length", "cancelled", "error"]


class _End:
    pass


_END = _End()


class ResponseStream:
    """Async iterator of text pieces for one request, fed from the engine's worker thread.

    Beyond the pieces it tells the caller its place in the queue, any notices (a prompt cut to
    fit the context, a capped token budget), token counts, and why it finished. `cancel()` ends
    generation early; the pieces already produced stay valid and iteration ends normally.
    """

    def __init__(
        self, request: GenerationRequest, position: Callable[[ResponseStream], int | None]
    ):
        self.request = request
        self.notices: list[str] = []
        self.finish_reason: FinishReason | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | _End | BaseException] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._started = threading.Event()
        self._position = position
        self._text: list[str] = []

    # -- caller side -------------------------------------------------------------------------
    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> str:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # iterating again after the end stays at the end
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        self._text.append(item)
        return item

    async def text(self) -> str:
        """Wait for the whole answer and return it."""
        async for _ in self:
            pass
        return "".join(self._text)

    @property
    def received(self) -> str:
        """The text iterated so far."""
        return "".join(self._text)

    @property
    def queue_position(self) -> int | None:
        """1 for the next to run, 2 for the one after...; 0 while generating; None when done."""
        if self.finish_reason is not None:
            return None
        if self._started.is_set():
            return 0
        return self._position(self)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating (or drop the request from the queue); safe from any thread."""
        self._cancelled.set()

    # -- worker side -------------------------------------------------------------------------
    def _deliver(self, item: str | _End | BaseException) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening
            self._cancelled.set()
            return False
        return True

    def _mark_started(self) -> None:
        self._started.set()

    def _push(self, piece: str) -> bool:
        """Send a piece; False when the caller has gone or cancelled."""
        if not piece:
            return not self._cancelled.is_set()
        return self._deliver(piece) and not self._cancelled.is_set()

    def _notice(self, text: str) -> None:
        self.notices.append(text)

    def _finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self._deliver(_END)

    def _fail(self, error: BaseException) -> None:
        if not isinstance(error, LoracordError):
            log.error("generation failed", exc_info=error)
            wrapped = ModelError("the model failed while answering; the bot's log has the details")
            wrapped.__cause__ = error
            error = wrapped
        self.finish_reason = "error"
        self._deliver(error)
        self._deliver(_END)
