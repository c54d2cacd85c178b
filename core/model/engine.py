"""Serving: one worker thread owns the model; the event loop only submits and reads streams.

`LocalEngine.submit()` never blocks the event loop: it validates the request, puts it on a
bounded queue (a full queue raises `EngineBusy` at once) and returns a `ResponseStream` that the
worker feeds token by token. Requests run one after another today; the worker takes work through
`_next_batch()` so that batching rows with different adapters (the adapters issue) slots in
there without changing the interface. The engine knows nothing about Discord or channels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from core.errors import EngineBusy, EngineClosed, LoracordError, ModelError, PromptError
from core.model.kernels import Runtime
from core.model.loader import ModelInfo, describe, load_for_serving
from core.model.requests import ChatMessage, GenerationRequest, ResponseStream
from core.model.source import ResolvedModel

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLOSED = "the bot is shutting down; ask again when it is back"


class Engine(Protocol):
    """What every serving backend offers: start, submit a request for a stream, close."""

    async def start(self) -> ModelInfo: ...
    async def submit(self, request: GenerationRequest) -> ResponseStream: ...
    async def close(self) -> None: ...


class LocalEngine:
    """In-process engine: a GPTQ model on this machine's CPU or GPU, served by one thread."""

    def __init__(
        self,
        locate: Callable[[], ResolvedModel],
        runtime: Runtime,
        *,
        queue_size: int = 16,
        max_new_tokens_cap: int = 1024,
        max_context_tokens: int = 2048,
        system_prompt: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.locate = locate
        self.runtime = runtime
        self.source: ResolvedModel | None = None
        self.queue_size = queue_size
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_context_tokens = max_context_tokens
        self.system_prompt = system_prompt
        self.threads = threads
        self.info: ModelInfo | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self._waiting: deque[ResponseStream] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ready: Future[ModelInfo] = Future()
        self._load_error: ModelError | None = None
        self._serving: ResponseStream | None = None  # the request generating now

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> ModelInfo:
        """Start the worker and load the model on it; returns what was loaded."""
        with self._cond:
            if self._closing:
                raise EngineClosed(_CLOSED)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="loracord-engine", daemon=True
                )
                self._thread.start()
        # Shielded: a caller that gives up waiting (Ctrl-C during a build) must not cancel the
        # load's outcome for everyone else.
        return await asyncio.shield(asyncio.wrap_future(self._ready))

    async def close(self) -> None:
        """Cancel what is queued, let the running request end, stop the worker.

        While the model is still being located, built or loaded (minutes on a first start) the
        worker is not waited for: it is a daemon thread, and a build publishes its folder only
        once complete, so leaving it behind loses nothing and shutdown stays prompt.
        """
        with self._cond:
            self._closing = True
            self._fail_waiting(lambda: EngineClosed(_CLOSED))
            self._cond.notify_all()
            loaded = self._ready.done()
            self._settle(EngineClosed(_CLOSED))
        if self._thread is None:
            return
        if not loaded:
            log.info("engine closed while the model was loading; not waiting for the load")
            return
        await asyncio.to_thread(self._thread.join)

    def _settle(self, outcome: ModelInfo | BaseException) -> None:
        """Resolve `_ready` once: the loaded model, or why there is none (call under `_cond`)."""
        if self._ready.done():
            return
        if isinstance(outcome, BaseException):
            self._ready.set_exception(outcome)
        else:
            self._ready.set_result(outcome)

    def _fail_waiting(self, error: Callable[[], LoracordError]) -> None:
        """Tell every queued request why it will not be answered (call under `_cond`)."""
        for stream in self._waiting:
            stream._fail(error())  # one exception each: each is raised in its own task
        self._waiting.clear()

    def _refusal(self) -> LoracordError | None:
        """Why no request can be taken now, or None (call under `_cond`)."""
        if self._load_error is not None:
            return self._load_error_copy()
        if self._closing:
            return EngineClosed(_CLOSED)
        if self._thread is None:
            return EngineClosed("the model was never started, so no question can be answered")
        return None

    def _load_error_copy(self) -> ModelError:
        """The load error, as a fresh exception per caller (one raise does not grow another's
        traceback)."""
        assert self._load_error is not None
        error = ModelError(str(self._load_error))
        error.__cause__ = self._load_error.__cause__
        return error

    @property
    def context_tokens(self) -> int:
        return self.info.context_tokens if self.info else self.max_context_tokens

    # -- requests ----------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> ResponseStream:
        """Queue a request; returns its stream at once. Raises EngineBusy when the queue is full."""
        asked = request.params.max_new_tokens
        request = self._validated(request)
        stream = ResponseStream(request, self._position_of)
        if request.params.max_new_tokens < asked:
            stream._notice(f"max_tokens was capped at {request.params.max_new_tokens}.")
        with self._cond:
            if refusal := self._refusal():
                raise refusal
            if len(self._waiting) >= self.queue_size:
                raise EngineBusy(
                    f"the model is busy ({len(self._waiting)} questions waiting); "
                    "try again in a minute"
                )
            self._waiting.append(stream)
            self._cond.notify_all()
        return stream

    def _validated(self, request: GenerationRequest) -> GenerationRequest:
        if not request.messages or not any(
            m.content.strip() for m in request.messages if m.role == "user"
        ):
            raise PromptError("the prompt is empty; ask a question")
        p = request.params  # checked when it was built
        messages = tuple(request.messages)
        if self.system_prompt and not any(m.role == "system" for m in messages):
            messages = (ChatMessage("system", self.system_prompt), *messages)
        capped = min(p.max_new_tokens, self.max_new_tokens_cap)
        params = dataclasses.replace(p, max_new_tokens=capped)
        return GenerationRequest(messages=messages, adapter=request.adapter, params=params)

    def _position_of(self, stream: ResponseStream) -> int | None:
        """How many live requests are ahead of `stream` (the one generating included): 0 when
        none is, so a request that is next while the worker idles is starting, not queued."""
        with self._cond:
            ahead = 1 if self._serving is not None else 0
            for waiting in self._waiting:
                if waiting is stream:
                    return ahead
                if not waiting.cancelled:  # dropped when the worker reaches it
                    ahead += 1
        return None

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker between generation steps (adapter loads go through here)."""
        future: Future[T] = Future()
        with self._cond:
            if refusal := self._refusal():
                raise refusal
            self._calls.append((fn, future))
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    # -- worker ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._load()
        except BaseException as e:
            self._load_failed(e)
            return
        assert self.info is not None
        with self._cond:
            self._settle(self.info)
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            for stream in batch:
                self._serve(stream)
            with self._cond:
                self._serving = None
        log.info("engine worker stopped")

    def _load_failed(self, e: BaseException) -> None:
        """Keep the load error: `start()`, every queued request and every later submit get it."""
        error = e if isinstance(e, ModelError) else ModelError(f"could not load the model: {e}")
        if error is not e:
            error.__cause__ = e
        with self._cond:
            self._load_error = error
            self._fail_waiting(self._load_error_copy)
            for _fn, future in self._calls:
                if future.set_running_or_notify_cancel():
                    future.set_exception(self._load_error_copy())
            self._calls.clear()
            self._settle(error)

    def _load(self) -> None:
        import torch

        if self.runtime.device == "cpu":
            torch.set_num_threads(self.threads or max(1, os.cpu_count() or 1))
        self.source = source = self.locate()  # may build the embedded model: minutes, once
        self.model, self.tokenizer, seconds = load_for_serving(source.path, self.runtime)
        self.info = describe(
            source.name, source.path, self.model, self.runtime, seconds, self.max_context_tokens
        )
        log.info(
            "model ready in %.1f s: %s, %d-bit g%d, %s, %s on %s",
            seconds,
            self.info.name,
            self.info.bits,
            self.info.group_size,
            self.info.kernel,
            self.info.dtype,
            self.info.device,
        )

    def _next_batch(self) -> list[ResponseStream] | None:
        """Block until there is work; run pending calls; return the requests to serve next."""
        with self._cond:
            while True:
                while self._calls:
                    fn, future = self._calls.popleft()
                    self._cond.release()
                    try:
                        if future.set_running_or_notify_cancel():
                            future.set_result(fn())
                    except BaseException as e:
                        future.set_exception(e)
                    finally:
                        self._cond.acquire()
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()._finish("cancelled")
                if self._waiting:
                    self._serving = self._waiting.popleft()
                    return [self._serving]
                if self._closing:
                    return None
                self._cond.wait()

    def _serve(self, stream: ResponseStream) -> None:
        from core.model.generate import generate_into

        stream._mark_started()
        try:
            generate_into(self.model, self.tokenizer, stream, self.context_tokens)
        except BaseException as e:
            stream._fail(e)
