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


@dataclass(frozen=True)
class AdapterStatus:
    """An adapter the engine knows: in a slot now (`slot`), or held ready to load into one on
    use (`slot` None); `requests` waiting or running on it; `unloading` once it was unloaded but
    requests that started on it are still finishing."""

    ref: AdapterRef
    rank: int
    slot: int | None
    requests: int
    unloading: bool = False


# The system prompt every front uses unless settings say otherwise. Empty means the model's
# own default (the one its chat template carries, which it was trained with): on the embedded
# model every custom prompt measured made answers worse (BENCHMARKS.md, "Answer defaults").
DEFAULT_SYSTEM_PROMPT = ""
# A custom prompt of the kind operators write, so calibration covers prompts besides the default.
CUSTOM_SYSTEM_PROMPT_EXAMPLE = (
    "You are loracord, a friendly assistant in a Discord server. Answer briefly and helpfully."
)


def with_system_prompt(
    system_prompt: str | None, messages: Sequence[ChatMessage]
) -> tuple[ChatMessage, ...]:
    """The messages as served: the system prompt first unless they bring their own or it is
    empty (then the chat template's own default applies)."""
    if system_prompt and not any(m.role == "system" for m in messages):
        return (ChatMessage("system", system_prompt), *messages)
    return tuple(messages)


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


class _Shared:
    """State one request's two ends share: the consumer's `ResponseStream` and the worker's
    `StreamSink`. Neither end reaches into the other; both read and write this."""

    def __init__(self, request: GenerationRequest, position: Callable[[], int | None]):
        self.request = request
        self.position = position
        self.notices: list[str] = []
        self.finish_reason: FinishReason | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | _End | BaseException] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.started = threading.Event()


class ResponseStream:
    """What a caller sees of one request: an async iterator of text pieces.

    Beyond the pieces it tells the caller its place in the queue, any notices (a prompt cut to
    fit the context, a capped token budget), token counts, and why it finished. `cancel()` ends
    generation early; the pieces already produced stay valid and iteration ends normally.
    """

    def __init__(self, shared: _Shared):
        self._shared = shared
        self._text: list[str] = []

    @property
    def request(self) -> GenerationRequest:
        return self._shared.request

    @property
    def notices(self) -> list[str]:
        return self._shared.notices

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._shared.finish_reason

    @property
    def prompt_tokens(self) -> int:
        return self._shared.prompt_tokens

    @property
    def adapter(self) -> AdapterRef | None:
        """The adapter version this answer is served with (None: the base model)."""
        return self._shared.request.adapter

    @property
    def completion_tokens(self) -> int:
        return self._shared.completion_tokens

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> str:
        queue = self._shared.queue
        item = await queue.get()
        if isinstance(item, _End):
            queue.put_nowait(item)  # iterating again after the end stays at the end
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
        if self._shared.finish_reason is not None:
            return None
        if self._shared.started.is_set():
            return 0
        return self._shared.position()

    @property
    def cancelled(self) -> bool:
        return self._shared.cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating (or drop the request from the queue); safe from any thread."""
        self._shared.cancelled.set()


class StreamSink:
    """The engine's end of one request: it feeds text, notices and the outcome to the
    `ResponseStream` the caller holds. Safe to call from the engine's worker thread."""

    def __init__(self, shared: _Shared):
        self._shared = shared

    @property
    def request(self) -> GenerationRequest:
        return self._shared.request

    @property
    def cancelled(self) -> bool:
        """The caller cancelled, or went away (its event loop closed)."""
        return self._shared.cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self._shared.finish_reason is not None

    def _deliver(self, item: str | _End | BaseException) -> bool:
        try:
            self._shared.loop.call_soon_threadsafe(self._shared.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone: nobody is listening
            self._shared.cancelled.set()
            return False
        return True

    def started(self, prompt_tokens: int) -> None:
        """The request left the queue and its prompt (this many tokens) is being read."""
        self._shared.prompt_tokens = prompt_tokens
        self._shared.started.set()

    def push(self, piece: str, tokens: int = 1) -> bool:
        """Count `tokens` more answer tokens and send their text; False when the caller has
        gone or cancelled."""
        self._shared.completion_tokens += tokens
        if not piece:
            return not self.cancelled
        return self._deliver(piece) and not self.cancelled

    def notice(self, text: str) -> None:
        self._shared.notices.append(text)

    def finish(self, reason: FinishReason) -> None:
        if self._shared.finish_reason is not None:
            return
        self._shared.finish_reason = reason
        self._deliver(_END)

    def fail(self, error: BaseException) -> None:
        """End the stream with `error` (raised to the caller); bugs become one ModelError line."""
        if self._shared.finish_reason is not None:
            return
        if not isinstance(error, LoracordError):
            log.error("generation failed", exc_info=error)
            wrapped = ModelError("the model failed while answering; the bot's log has the details")
            wrapped.__cause__ = error
            error = wrapped
        self._shared.finish_reason = "error"
        self._deliver(error)
        self._deliver(_END)


def open_stream(
    request: GenerationRequest, position: Callable[[], int | None] = lambda: None
) -> tuple[ResponseStream, StreamSink]:
    """The two ends of one request's stream (call on the caller's event loop).

    `position` says how many live requests are ahead while it waits (None when unknown).
    """
    shared = _Shared(request, position)
    return ResponseStream(shared), StreamSink(shared)
