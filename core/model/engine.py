"""Serving: the `Engine` protocol, and `LocalEngine`, a step loop on one worker thread.

`Engine` is the seam between the model and everything else (the app, the Discord bot, the
console, the CLI): start, submit a request for a stream, info, capacity, close. `LocalEngine`
serves a GPTQ model in this process; a remote engine (a vLLM server) would offer the same.

`LocalEngine.submit()` never blocks the event loop: the prompt is rendered and fitted in a
thread (a prompt that cannot be served is refused before it queues), then the request joins a
bounded waiting set (a full one raises `EngineBusy` at once) and a `ResponseStream` comes back.
The worker thread owns the model. Each iteration of its loop runs control operations, drops
cancelled requests, admits waiting ones into free rows of the KV cache, and runs one step: a
token for every decoding row plus prompt chunks within a token budget (continuous batching).
The engine knows nothing about Discord or channels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from core.errors import EngineBusy, EngineClosed, LoracordError, ModelError, PromptError
from core.model.decoding import IncrementalDetokenizer, fit_prompt, stop_token_ids
from core.model.kernels import Runtime
from core.model.loader import Capacity, ModelInfo, describe, load_for_serving
from core.model.requests import (
    GenerationRequest,
    ResponseStream,
    open_stream,
    with_system_prompt,
)
from core.model.scheduler import Prepared, Scheduler, Sequence
from core.model.source import ResolvedModel

if TYPE_CHECKING:  # torch is imported when the model loads, not with this module
    from core.model.batch import BatchModel
    from core.model.sampling import SeenTokens

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLOSED = "the bot is shutting down; ask again when it is back"
# Tokens kept free for the answer when a prompt is fitted to a small context window.
_MIN_ANSWER_ROOM = 32


class Engine(Protocol):
    """What every serving backend offers. `info` and `capacity` are None until `start()`."""

    async def start(self) -> ModelInfo: ...
    async def submit(self, request: GenerationRequest) -> ResponseStream: ...
    @property
    def info(self) -> ModelInfo | None: ...
    @property
    def capacity(self) -> Capacity | None: ...
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
        batch_rows: int = 8,
        prefill_tokens_per_step: int = 256,
        system_prompt: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.locate = locate
        self.runtime = runtime
        self.source: ResolvedModel | None = None
        self.queue_size = queue_size
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_context_tokens = max_context_tokens
        self.batch_rows = batch_rows
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.system_prompt = system_prompt
        self.threads = threads
        self._info: ModelInfo | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._batch: BatchModel | None = None
        self._seen: SeenTokens | None = None
        self._stops: set[int] = set()
        self._scheduler = Scheduler(batch_rows)
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._cond = threading.Condition()
        self._prepare_lock = threading.Lock()  # one tokenizer user at a time off the worker
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ready: Future[ModelInfo] = Future()
        self._load_error: ModelError | None = None

    # -- what callers may read ---------------------------------------------------------------
    @property
    def info(self) -> ModelInfo | None:
        return self._info

    @property
    def capacity(self) -> Capacity | None:
        return self._batch.capacity if self._batch else None

    @property
    def context_tokens(self) -> int:
        return self._info.context_tokens if self._info else self.max_context_tokens

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
        """Tell queued requests the bot is shutting down, let running ones end, stop the worker.

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
        for sequence in self._scheduler.waiting:
            sequence.sink.fail(error())  # one exception each: each is raised in its own task
        self._scheduler.waiting.clear()

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

    # -- requests ----------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest) -> ResponseStream:
        """Prepare and queue a request; returns its stream. Raises `PromptError` for a prompt
        that cannot be served and `EngineBusy` when the queue is full, before queueing."""
        request = self._with_system_prompt(request)
        with self._cond:
            self._check_room()
        prepared = None
        if self._tokenizer is not None:  # before the load, the worker prepares it on admission
            prepared = await asyncio.to_thread(self._prepare, request)
        sequence: Sequence
        stream, sink = open_stream(request, lambda: self._position_of(sequence))
        sequence = Sequence(sink, prepared)
        if prepared:
            for notice in prepared.notices:
                sink.notice(notice)
        with self._cond:
            self._check_room()
            self._scheduler.waiting.append(sequence)
            self._cond.notify_all()
        return stream

    def _check_room(self) -> None:
        """Raise why a new request cannot queue now (call under `_cond`)."""
        if refusal := self._refusal():
            raise refusal
        for sequence in self._scheduler.drop_cancelled(running=False):  # they hold no place
            sequence.sink.finish("cancelled")
        waiting = self._scheduler.waiting
        if len(waiting) >= self.queue_size:
            raise EngineBusy(
                f"the model is busy ({len(waiting)} questions waiting); try again in a minute"
            )

    def _with_system_prompt(self, request: GenerationRequest) -> GenerationRequest:
        if not request.messages or not any(
            m.content.strip() for m in request.messages if m.role == "user"
        ):
            raise PromptError("the prompt is empty; ask a question")
        messages = with_system_prompt(self.system_prompt, request.messages)
        return dataclasses.replace(request, messages=messages)

    def _prepare(self, request: GenerationRequest) -> Prepared:
        """Render and fit the prompt, and settle the answer's token budget (the one place the
        cap and its notices are applied). Raises `PromptError` when it cannot be served."""
        notices = []
        asked = request.params.max_new_tokens
        budget = min(asked, self.max_new_tokens_cap)
        if budget < asked:
            notices.append(f"max_tokens was capped at {budget}.")
        context = self.context_tokens
        room = min(budget, max(1, context - _MIN_ANSWER_ROOM))
        if room < budget:
            notices.append(f"max_tokens was lowered to {room} to fit the context window.")
        with self._prepare_lock:
            fitted = fit_prompt(self._tokenizer, request.messages, context - room)
        return Prepared(fitted.input_ids, room, [*notices, *fitted.notices])

    def _position_of(self, sequence: Sequence) -> int | None:
        """The waiting sequence's place: 0 when a free row takes it at the next step, 1 when it
        is next once a row frees, and so on. Cancelled requests ahead hold no place. Out of
        the queue it is 0 until it finishes (admitted to a row, not yet `started`), then None."""
        with self._cond:
            ahead = 0
            for waiting in self._scheduler.waiting:
                if waiting is sequence:
                    return max(0, ahead - self._scheduler.free_rows + 1)
                if not waiting.sink.cancelled:  # dropped at the next step
                    ahead += 1
        return None if sequence.sink.finished else 0

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the worker between steps (adapter loads go through here)."""
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
        assert self._info is not None
        with self._cond:
            self._settle(self._info)
        while self._next_step():
            try:
                self._step()
            except BaseException as e:  # the step failed: its rows end with the error
                self._fail_running(e)
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

        from core.model.batch import BatchModel
        from core.model.sampling import SeenTokens

        if self.runtime.device == "cpu":
            torch.set_num_threads(self.threads or max(1, os.cpu_count() or 1))
        self.source = source = self.locate()  # may build the embedded model: minutes, once
        model, tokenizer, seconds = load_for_serving(source.path, self.runtime)
        info = describe(
            source.name, source.path, model, self.runtime, seconds, self.max_context_tokens
        )
        try:
            batch = BatchModel(model, self.batch_rows, info.context_tokens)
        except torch.OutOfMemoryError as e:
            raise ModelError(
                f"no memory for a KV cache of {self.batch_rows} rows x {info.context_tokens} "
                "tokens; lower batch_rows or max_context_tokens"
            ) from e
        capacity = batch.capacity
        self._seen = SeenTokens(capacity.rows, int(model.config.vocab_size), model.device)
        self._stops = stop_token_ids(model, tokenizer)
        self._model, self._batch = model, batch
        self._info = dataclasses.replace(
            info,
            context_tokens=capacity.context_tokens,
            rows=capacity.rows,
            kv_cache_bytes=capacity.kv_cache_bytes,
        )
        self._tokenizer = tokenizer  # last: submit() prepares prompts from here on
        log.info(
            "model ready in %.1f s: %s, %d-bit g%d, %s, %s on %s; %d rows x %d tokens "
            "(KV cache %.0f MiB)",
            seconds,
            info.name,
            info.bits,
            info.group_size,
            info.kernel,
            info.dtype,
            info.device,
            capacity.rows,
            capacity.context_tokens,
            capacity.kv_cache_bytes / 2**20,
        )

    def _next_step(self) -> bool:
        """Block until there is work: run control operations, drop cancelled requests, admit
        waiting ones. False when the engine is closing and nothing runs."""
        scheduler = self._scheduler
        with self._cond:
            while True:
                while self._calls:
                    fn, future = self._calls.pop(0)
                    self._cond.release()
                    try:
                        if future.set_running_or_notify_cancel():
                            future.set_result(fn())
                    except BaseException as e:
                        future.set_exception(e)
                    finally:
                        self._cond.acquire()
                for sequence in scheduler.drop_cancelled(running=True):
                    sequence.sink.finish("cancelled")
                admitted = scheduler.admit()
                if admitted or scheduler.running:
                    break
                if self._closing and not scheduler.waiting:
                    return False
                self._cond.wait()
        for sequence in admitted:
            self._start(sequence)
        return True

    def _start(self, sequence: Sequence) -> None:
        """Set up an admitted sequence on its row (on the worker, outside the lock)."""
        assert self._seen is not None and sequence.row is not None
        try:
            if sequence.prepared is None:  # queued while the model loaded
                sequence.prepared = self._prepare(sequence.sink.request)
                for notice in sequence.prepared.notices:
                    sequence.sink.notice(notice)
        except BaseException as e:
            with self._cond:
                self._scheduler.retire(sequence)
            sequence.sink.fail(e)
            return
        from core.model.sampling import RowSampler

        sequence.sampler = RowSampler.for_params(sequence.sink.request.params, self._model.device)
        sequence.detokenizer = IncrementalDetokenizer(self._tokenizer)
        self._seen.reset(sequence.row, sequence.prompt)
        sequence.sink.started(len(sequence.prompt))

    def _step(self) -> None:
        """One forward pass for every running row, then deliver what it produced."""
        from core.model.sampling import choose

        assert self._batch is not None and self._seen is not None
        with self._cond:
            planned = self._scheduler.plan(self.prefill_tokens_per_step)
        if not planned:
            return
        logits = self._batch.step([segment for _, segment in planned])
        sampling = [(s, seg) for s, seg in planned if seg.wants_logits]
        for sequence, segment in planned:
            sequence.fed += len(segment.tokens)
        if not sampling:
            return
        tokens = choose(
            logits,
            [s.sampler for s, _ in sampling],  # type: ignore[misc]
            [seg.row for _, seg in sampling],
            self._seen,
        )
        for (sequence, _), token in zip(sampling, tokens, strict=True):
            self._deliver(sequence, token)

    def _deliver(self, sequence: Sequence, token: int) -> None:
        sink = sequence.sink
        assert sequence.detokenizer is not None and sequence.prepared is not None
        reason = None
        if token in self._stops:
            reason = "stop"
        else:
            sequence.generated += 1
            if not sink.push(sequence.detokenizer.add(token)):
                reason = "cancelled"
            elif sequence.generated >= sequence.prepared.max_new_tokens:
                reason = "length"
        if reason is None:
            sequence.next_token = token
            return
        with self._cond:
            self._scheduler.retire(sequence)
        sink.finish(reason)  # type: ignore[arg-type]

    def _fail_running(self, error: BaseException) -> None:
        """End every running request with `error`; the engine keeps serving new ones."""
        with self._cond:
            running = list(self._scheduler.running)
            for sequence in running:
                self._scheduler.retire(sequence)
        for sequence in running:
            sequence.sink.fail(error)

    # -- for tests and measurements ----------------------------------------------------------
    async def run_on_model(self, fn: Callable[[Any, Any], T]) -> T:
        """Run `fn(model, tokenizer)` on the worker between steps: the Hugging Face model and
        its tokenizer, for references and measurements, never for serving."""
        return await self.call(lambda: fn(self._model, self._tokenizer))
