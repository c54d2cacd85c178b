"""Composition root: builds every service from the settings. Importing it starts nothing.

`build(settings)` wires the services; `await app.start()` loads the model (building the
embedded one on first use) off the event loop; `await app.close()` releases everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from core.adapters import Registry
from core.channels import BaseModel, ChannelAdapters, served_model_base
from core.model.engine import Engine, LocalEngine
from core.model.kernels import choose_runtime
from core.model.loader import ModelInfo, weights_sha256
from core.model.source import ResolvedModel, resolve
from core.scheduler import NightlySchedule
from core.settings import Settings
from core.store import AsyncQuoteStore, QuoteStore
from core.training.runner import TrainingRunner

log = logging.getLogger(__name__)


@dataclass
class App:
    """The services of one loracord process."""

    settings: Settings
    engine: Engine
    store: AsyncQuoteStore
    registry: Registry
    # Built from the fields above, so an app copied with another engine resolves through it.
    channels: ChannelAdapters = field(init=False, repr=False)
    trainer: TrainingRunner = field(init=False, repr=False)
    # The nightly training schedule: only the bot runs one (`start(schedule=True)`).
    schedule: NightlySchedule | None = field(default=None, init=False, repr=False)
    _watch: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _model: BaseModel | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.channels = ChannelAdapters(self.store, self.registry, self.engine, self._base)
        self.trainer = TrainingRunner(
            self.settings,
            self.store,
            self.registry,
            model_dir=self._model_dir,
            base=self._base,
            device=self._device,
            channels=self.channels,
        )

    def _model_dir(self) -> Path:
        """The served model's folder: the loaded one, else where the settings resolve (the CLI
        trains without loading the model in its own process)."""
        info = self.engine.info
        return Path(info.path) if info is not None else locate_model(self.settings).path

    def _base(self) -> BaseModel:
        info = self.engine.info
        if info is not None:
            return served_model_base(Path(info.path), info.weights_sha256)
        if self._model is None:
            folder = self._model_dir()
            self._model = served_model_base(folder, weights_sha256(folder))
        return self._model

    def _device(self) -> str:
        info = self.engine.info
        if info is not None:
            return "cuda" if str(info.device).startswith("cuda") else "cpu"
        return choose_runtime(self.settings.device, self.settings.dtype, "auto").device

    async def start(self, *, watch_adapters: bool = False, schedule: bool = False) -> ModelInfo:
        """Open the database, then load the model; returns what was loaded. `watch_adapters`
        (the bot and the console) keeps the engine's adapters in step with the bindings and
        the registry, which the CLI may change from another process. `schedule` (the bot)
        starts the nightly training schedule."""
        await self.store.open()
        info = await self.engine.start()
        if watch_adapters and self._watch is None:
            self._watch = asyncio.create_task(self.channels.watch(), name="loracord-adapters")
        if schedule and self.schedule is None:
            self.schedule = NightlySchedule.from_settings(self.settings, self.trainer.nightly)
            await self.schedule.start()
        return info

    async def close(self) -> None:
        """Stop the schedule and any training (nothing half-trained is kept), then the engine
        (queued requests are told the bot is shutting down), then the store."""
        if self.schedule is not None:
            await self.schedule.shutdown()
            self.schedule = None
        await self.trainer.close()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        try:
            await self.engine.close()
        finally:
            await self.store.close()

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def locate_model(settings: Settings, *, retry_build: bool = False) -> ResolvedModel:
    """Resolve the `model` setting to a local GPTQ folder (builds the embedded model once;
    `retry_build` tries again after a build that failed its quality gate)."""
    return resolve(settings.model, settings.cache_dir, retry_build=retry_build)


def build_registry(settings: Settings) -> Registry:
    """The adapter registry in `adapters_dir`."""
    return Registry(
        settings.adapters_dir,
        keep_versions=settings.adapter_versions_kept,
        max_rank=settings.adapter_max_rank,
    )


def build(settings: Settings) -> App:
    """Wire the services for `settings` without loading anything yet."""
    runtime = choose_runtime(settings.device, settings.dtype, settings.kernel)
    engine = LocalEngine(
        lambda: locate_model(settings),
        runtime,
        queue_size=settings.queue_size,
        max_new_tokens_cap=settings.max_new_tokens_cap,
        max_context_tokens=settings.max_context_tokens,
        batch_rows=settings.batch_rows,
        prefill_tokens_per_step=settings.prefill_tokens_per_step,
        fast_decode=settings.fast_decode,
        compiled_dir=settings.cache_dir / "compiled",
        gpu_memory_fraction=settings.gpu_memory_fraction,
        system_prompt=settings.system_prompt,
        threads=settings.threads,
        adapter_slots=settings.adapter_slots,
        adapter_max_rank=settings.adapter_max_rank,
        adapter_cache_size=settings.adapter_cache_size,
    )
    store = AsyncQuoteStore(QuoteStore.from_settings(settings))
    return App(settings, engine, store, build_registry(settings))
