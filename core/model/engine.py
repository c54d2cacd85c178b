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
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from core.adapters import AdapterSpec, BaseShapes, inspect_adapter
from core.errors import (
    AdapterError,
    EngineBusy,
    EngineClosed,
    LoracordError,
    ModelError,
    PromptError,
)
from core.model.decoding import IncrementalDetokenizer, fit_prompt, stop_token_ids
from core.model.kernels import Runtime
from core.model.loader import Capacity, ModelInfo, describe, load_for_serving
from core.model.requests import (
    AdapterRef,
    AdapterStatus,
    GenerationRequest,
    ResponseStream,
    open_stream,
    with_system_prompt,
)
from core.model.scheduler import Prepared, Scheduler, Sequence
from core.model.source import ResolvedModel

if TYPE_CHECKING:  # torch is imported when the model loads, not with this module
    from core.model.batch import BatchModel
    from core.model.lora import AdapterWeights
    from core.model.sampling import SeenTokens

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLOSED = "the bot is shutting down; ask again when it is back"
# Tokens kept free for the answer when a prompt is fitted to a small context window.
_MIN_ANSWER_ROOM = 32


class Engine(Protocol):
    """What every serving backend offers. `info` and `capacity` are None until `start()`.

    Adapters are plain PEFT folders: `load_adapter` makes a version servable (a request naming
    one that is not loaded is refused at submit), `unload_adapter` retires it once the requests
    that started on it have finished, `adapters()` lists what is loaded.
    """

    async def start(self) -> ModelInfo: ...
    async def submit(self, request: GenerationRequest) -> ResponseStream: ...
    async def load_adapter(self, ref: AdapterRef, path: Path) -> AdapterStatus: ...
    async def unload_adapter(self, ref: AdapterRef) -> None: ...
    def adapters(self) -> list[AdapterStatus]: ...
    @property
    def info(self) -> ModelInfo | None: ...
    @property
    def capacity(self) -> Capacity | None: ...
    async def close(self) -> None: ...


@dataclass(eq=False)
class _Adapter:
    """A loaded adapter version (worker state, guarded by the engine's lock)."""

    ref: AdapterRef
    spec: AdapterSpec
    slot: int | None = None
    last_used: int = 0  # step count when a request last ran on it: idle slots go LRU
    unloading: bool = False


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
        fast_decode: bool = True,
        compiled_dir: Path | None = None,
        gpu_memory_fraction: float = 0.45,
        system_prompt: str | None = None,
        threads: int | None = None,
        adapter_slots: int = 4,
        adapter_max_rank: int = 16,
        adapter_cache_size: int = 16,
    ) -> None:
        self.locate = locate
        self.runtime = runtime
        self.source: ResolvedModel | None = None
        self.queue_size = queue_size
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_context_tokens = max_context_tokens
        self.batch_rows = batch_rows
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.fast_decode = fast_decode
        self.compiled_dir = compiled_dir  # where the C++ decode step is built, once per CPU
        # On a GPU: this process's share of its memory (`core.model.memory`).
        self.gpu_memory_fraction = gpu_memory_fraction
        self.system_prompt = system_prompt
        self.threads = threads
        self.adapter_slots = adapter_slots
        self.adapter_max_rank = adapter_max_rank
        self.adapter_cache_size = adapter_cache_size
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
        self._shapes: BaseShapes | None = None
        # Adapters: the known versions (engine lock), the slot each fills (1..adapter_slots;
        # worker only), and their weights read into memory (an LRU of adapter_cache_size,
        # guarded by its own lock because submitters fill it from threads).
        self._adapters: dict[AdapterRef, _Adapter] = {}
        self._slots: list[_Adapter | None] = [None] * adapter_slots
        self._weights: OrderedDict[AdapterRef, AdapterWeights] = OrderedDict()
        self._weights_lock = threading.Lock()
        self._steps = 0
        self._filling: set[int] = set()  # empty slots an adapter is being copied into
        self._copy_stream: Any = None  # CUDA: the stream hot-loads copy on, beside the steps

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
            self._check_adapter(request.adapter)
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
            self._check_adapter(request.adapter)  # it may have been unloaded meanwhile
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

    def _check_adapter(self, ref: AdapterRef | None) -> None:
        """Raise `AdapterError` unless `ref` is the base model or a loaded adapter (call under
        `_cond`)."""
        if ref is None:
            return
        adapter = self._adapters.get(ref)
        if adapter is None or adapter.unloading:
            raise AdapterError(f"adapter {ref} is not loaded, so it cannot answer")

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
        if request.adapter is not None:  # read now, so admission only copies it into a slot
            self._weights_of(request.adapter)
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
        from core.model.memory import ServingMemory, apply_gpu_budget
        from core.model.sampling import SeenTokens

        if self.runtime.device == "cpu":
            torch.set_num_threads(self.threads or max(1, os.cpu_count() or 1))
        self.source = source = self.locate()  # may build the embedded model: minutes, once
        budget = None
        if self.runtime.device == "cuda":
            # Before the weights load: nothing this process allocates may take the trainer's
            # share of the GPU.
            budget = apply_gpu_budget(self.gpu_memory_fraction)
            free, _ = torch.cuda.mem_get_info()
            if free < budget.limit:
                log.warning(
                    "the GPU has %.1f GiB free, less than the bot's budget of %.1f GiB "
                    "(gpu_memory_fraction %g): another process is using it",
                    free / 2**30,
                    budget.limit / 2**30,
                    self.gpu_memory_fraction,
                )
        model, tokenizer, seconds = load_for_serving(source.path, self.runtime)
        info = describe(
            source.name, source.path, model, self.runtime, seconds, self.max_context_tokens
        )
        shapes = BaseShapes.from_config(model.config.to_dict())
        if budget is not None:
            budget.check(
                ServingMemory.plan(
                    shapes,
                    torch.cuda.memory_allocated(),
                    rows=self.batch_rows,
                    context=info.context_tokens,
                    slots=self.adapter_slots,
                    max_rank=self.adapter_max_rank,
                    element_size=model.dtype.itemsize,
                )
            )
            info = dataclasses.replace(info, gpu_budget_bytes=budget.limit)
        try:
            batch = BatchModel(
                model,
                self.batch_rows,
                info.context_tokens,
                adapter_slots=self.adapter_slots,
                adapter_max_rank=self.adapter_max_rank,
                fast=self.fast_decode,
                build_dir=self.compiled_dir,
            )
        except torch.OutOfMemoryError as e:
            within = f" within the bot's GPU budget ({info.gpu_budget_bytes / 2**30:.1f} GiB)"
            raise ModelError(
                f"no memory for a KV cache of {self.batch_rows} rows x {info.context_tokens} "
                f"tokens and {self.adapter_slots} adapter slots{within if budget else ''}; "
                "lower batch_rows, max_context_tokens or adapter_slots"
            ) from e
        self._shapes = shapes
        capacity = batch.capacity
        self._seen = SeenTokens(capacity.rows, int(model.config.vocab_size), model.device)
        self._stops = stop_token_ids(model, tokenizer)
        self._model, self._batch = model, batch
        self._info = dataclasses.replace(
            info,
            context_tokens=capacity.context_tokens,
            rows=capacity.rows,
            kv_cache_bytes=capacity.kv_cache_bytes,
            adapter_slots=self.adapter_slots,
            adapter_max_rank=self.adapter_max_rank,
            decode_path=batch.decode_path,
        )
        self._tokenizer = tokenizer  # last: submit() prepares prompts from here on
        log.info(
            "model ready in %.1f s: %s, %d-bit g%d, %s, %s on %s; %d rows x %d tokens "
            "(KV cache %.0f MiB); decode %s",
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
            batch.decode_path,
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
                self._reap_adapters()
                admitted = scheduler.admit(self._place)
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
            self._steps += 1
            for sequence, _ in planned:
                if sequence.adapter_slot:
                    slotted = self._slots[sequence.adapter_slot - 1]
                    assert slotted is not None
                    slotted.last_used = self._steps
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
        log.info(
            "answered %d tokens (%s) with %s",
            sequence.generated,
            reason,
            sink.request.adapter or "the base model",
        )

    def _fail_running(self, error: BaseException) -> None:
        """End every running request with `error`; the engine keeps serving new ones."""
        with self._cond:
            running = list(self._scheduler.running)
            for sequence in running:
                self._scheduler.retire(sequence)
        for sequence in running:
            sequence.sink.fail(error)

    # -- adapters ----------------------------------------------------------------------------
    async def load_adapter(self, ref: AdapterRef, path: Path) -> AdapterStatus:
        """Make adapter version `ref` (a PEFT folder at `path`) servable, without a restart.

        The folder is checked against the served model and read in a thread. When a slot is
        empty it is copied there from that thread while the engine keeps stepping (no step
        reads an empty slot, and the slot is held so none is admitted to it), then registered
        under the engine's lock: the next admission serves it. Otherwise it goes, between two
        steps, into the slot whose adapter has been idle longest; with every slot busy it waits
        in memory and fills a slot when one frees. So no request sees half an adapter. Loading
        a version already loaded changes nothing. Raises `AdapterError` (one line) for an
        adapter the engine cannot serve; what was serving keeps serving.
        """
        started = time.perf_counter()
        with self._cond:
            if refusal := self._refusal():  # never started, closing, or the load failed
                raise refusal
        await asyncio.shield(asyncio.wrap_future(self._ready))  # the model's shapes are needed
        # One hop to a thread and back: each hop waits for the event loop and the interpreter
        # lock, which the busy worker holds most of the time.
        spec, weights, status = await asyncio.to_thread(self._load_beside, ref, path)
        if status is None:  # no empty slot: between two steps, on the worker
            status = await self.call(lambda: self._install(ref, spec, weights))
        log.info(
            "adapter %s loaded in %.1f ms (%s)",
            ref,
            (time.perf_counter() - started) * 1000,
            f"slot {status.slot}" if status.slot else "waiting for a free slot",
        )
        return status

    def _load_beside(
        self, ref: AdapterRef, path: Path
    ) -> tuple[AdapterSpec, AdapterWeights, AdapterStatus | None]:
        """Read and check `path`; when a slot is empty, copy it there and register it (a
        thread beside the worker). The status is None when no slot was empty.

        Into an empty slot the values are checked after the copy, on the device (on a GPU one
        batched reduction instead of two per matrix on the CPU)."""
        spec, weights = self._read_adapter(path, check=False)
        with self._cond:
            known = self._adapters.get(ref)
            slot = None
            if known is None or known.slot is None:
                empty = (
                    i
                    for i, held in enumerate(self._slots, start=1)
                    if held is None and i not in self._filling
                )
                slot = next(empty, None)
            if slot is not None:
                self._filling.add(slot)
        if slot is None:
            weights.check_finite()
            return spec, weights, None
        try:
            self._copy_into(slot, weights)
            return spec, weights, self._install(ref, spec, weights, slot=slot)
        finally:
            with self._cond:
                self._filling.discard(slot)

    def _copy_into(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter into an empty, held slot (a thread beside the worker: on CUDA on a
        stream of its own, finished before the slot is registered)."""
        import torch

        assert self._batch is not None and self._batch.lora is not None
        lora = self._batch.lora
        if lora.device.type != "cuda":
            lora.load(slot, weights, verify=True)
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=lora.device)
        with torch.cuda.stream(self._copy_stream):
            lora.load(slot, weights, verify=True)
        self._copy_stream.synchronize()

    async def unload_adapter(self, ref: AdapterRef) -> None:
        """Stop taking requests for `ref`; it leaves its slot once the requests that started
        on it (or queued for it) have finished. Unknown versions are ignored."""
        with self._cond:
            adapter = self._adapters.get(ref)
            if adapter is not None:
                adapter.unloading = True
            self._cond.notify_all()

    def adapters(self) -> list[AdapterStatus]:
        """The adapter versions loaded now, in slot order, then those waiting for a slot."""
        with self._cond:
            users = self._adapter_users()
            statuses = [
                AdapterStatus(a.ref, a.spec.rank, a.slot, users.get(a.ref, 0), a.unloading)
                for a in self._adapters.values()
            ]
        return sorted(statuses, key=lambda s: (s.slot is None, s.slot or 0, str(s.ref)))

    def _read_adapter(
        self, path: Path, *, check: bool = True
    ) -> tuple[AdapterSpec, AdapterWeights]:
        """Check and read an adapter folder (off the worker thread); `check=False` leaves its
        values to be checked by the caller."""
        from core.model.lora import read_weights

        assert self._shapes is not None
        spec = inspect_adapter(path, self._shapes, self.adapter_max_rank)
        return spec, read_weights(spec, check=check)

    def _install(
        self,
        ref: AdapterRef,
        spec: AdapterSpec,
        weights: AdapterWeights,
        *,
        slot: int | None = None,
    ) -> AdapterStatus:
        """Register `ref`: already copied into the empty `slot` (any thread), or copied now into
        a free or idle slot (on the worker, between steps)."""
        with self._cond:
            adapter = self._adapters.get(ref)
            if adapter is None:
                adapter = self._adapters[ref] = _Adapter(ref, spec)
            adapter.unloading = False
            self._remember_weights(ref, weights)
            if adapter.slot is None:
                if slot is not None:  # filled beside the worker
                    self._slots[slot - 1] = adapter
                    adapter.slot = slot
                    adapter.last_used = self._steps
                elif (free := self._free_slot()) is not None:
                    self._fill(free, adapter, weights)
            users = self._adapter_users().get(ref, 0)
            return AdapterStatus(ref, spec.rank, adapter.slot, users)

    def _adapter_users(self) -> dict[AdapterRef, int]:
        """Requests waiting or running on each adapter (call under `_cond`)."""
        users: dict[AdapterRef, int] = {}
        for sequence in (*self._scheduler.waiting, *self._scheduler.running):
            ref = sequence.sink.request.adapter
            if ref is not None:
                users[ref] = users.get(ref, 0) + 1
        return users

    def _free_slot(self) -> int | None:
        """An empty slot, else the one whose adapter has been idle longest, else None (call
        under `_cond`, on the worker)."""
        busy = {s.adapter_slot for s in self._scheduler.running}
        idle = []
        for index, holder in enumerate(self._slots, start=1):
            if index in self._filling:  # being filled by a load beside the worker
                continue
            if holder is None:
                return index
            if index not in busy:
                idle.append((holder.last_used, index))
        return min(idle)[1] if idle else None

    def _fill(self, slot: int, adapter: _Adapter, weights: AdapterWeights) -> None:
        """Copy `adapter` into `slot`, evicting the idle adapter there (on the worker)."""
        assert self._batch is not None and self._batch.lora is not None
        previous = self._slots[slot - 1]
        if previous is not None:
            previous.slot = None
        self._batch.lora.load(slot, weights)
        self._slots[slot - 1] = adapter
        adapter.slot = slot
        adapter.last_used = self._steps

    def _place(self, sequence: Sequence) -> bool:
        """Give an admitted sequence its adapter's slot, loading the adapter into one when it
        is not resident; False when every slot is busy with other adapters (it waits, and the
        requests behind it wait too, so none is passed over for long). Under `_cond`."""
        ref = sequence.sink.request.adapter
        if ref is None:
            sequence.adapter_slot = 0
            return True
        adapter = self._adapters[ref]  # held since submit: unloading waits for its requests
        if adapter.slot is None:
            slot = self._free_slot()
            if slot is None:
                return False
            self._fill(slot, adapter, self._weights_of(ref))
        assert adapter.slot is not None
        sequence.adapter_slot = adapter.slot
        return True

    def _reap_adapters(self) -> None:
        """Drop unloaded adapters that no request uses any more (under `_cond`, worker)."""
        gone = [a for a in self._adapters.values() if a.unloading]
        if not gone:
            return
        users = self._adapter_users()
        for adapter in gone:
            if users.get(adapter.ref):
                continue
            if adapter.slot is not None:
                assert self._batch is not None and self._batch.lora is not None
                self._batch.lora.clear(adapter.slot)
                self._slots[adapter.slot - 1] = None
            del self._adapters[adapter.ref]
            with self._weights_lock:
                self._weights.pop(adapter.ref, None)
            log.info("adapter %s unloaded", adapter.ref)

    def _remember_weights(self, ref: AdapterRef, weights: AdapterWeights) -> None:
        with self._weights_lock:
            self._weights[ref] = weights
            self._weights.move_to_end(ref)
            while len(self._weights) > self.adapter_cache_size:
                self._weights.popitem(last=False)

    def _weights_of(self, ref: AdapterRef) -> AdapterWeights:
        """`ref`'s weights from memory, or read again from its folder when the cache let them
        go (any thread)."""
        from core.model.lora import read_weights

        with self._weights_lock:
            weights = self._weights.get(ref)
            if weights is not None:
                self._weights.move_to_end(ref)
                return weights
        adapter = self._adapters.get(ref)
        if adapter is None:
            raise AdapterError(f"adapter {ref} is not loaded, so it cannot answer")
        weights = read_weights(adapter.spec)
        self._remember_weights(ref, weights)
        return weights

    # -- for tests and measurements ----------------------------------------------------------
    async def run_on_model(self, fn: Callable[[Any, Any], T]) -> T:
        """Run `fn(model, tokenizer)` on the worker between steps: the Hugging Face model and
        its tokenizer, for references and measurements, never for serving."""
        return await self.call(lambda: fn(self._model, self._tokenizer))
