"""Composition root: builds every service from the settings. Importing it starts nothing.

`build(settings)` wires the services; `await app.start()` loads the model (building the
embedded one on first use) off the event loop; `await app.close()` releases everything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType

from core.model.engine import Engine, LocalEngine
from core.model.kernels import choose_runtime
from core.model.loader import ModelInfo
from core.model.source import ResolvedModel, resolve
from core.settings import Settings
from core.store import AsyncQuoteStore, QuoteStore

log = logging.getLogger(__name__)


@dataclass
class App:
    """The services of one loracord process."""

    settings: Settings
    engine: Engine
    store: AsyncQuoteStore

    async def start(self) -> ModelInfo:
        """Open the database, then load the model; returns what was loaded."""
        await self.store.open()
        return await self.engine.start()

    async def close(self) -> None:
        """Stop the engine (queued requests are told the bot is shutting down), close the store."""
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
    return resolve(
        settings.model, settings.cache_dir, settings.embedded_group_size, retry_build=retry_build
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
        system_prompt=settings.system_prompt,
        threads=settings.threads,
    )
    store = AsyncQuoteStore(QuoteStore.from_settings(settings))
    return App(settings=settings, engine=engine, store=store)
